//! Figures drawn with plotters (PNG and SVG). Text uses an embedded font, so figures render the
//! same on a machine without system fonts.

use std::sync::Once;

static FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");
static REGISTER: Once = Once::new();

/// Register the embedded font as plotters' `sans-serif` family (idempotent). Call before drawing.
pub fn ensure_font() {
    REGISTER.call_once(|| {
        for style in [
            plotters::style::FontStyle::Normal,
            plotters::style::FontStyle::Bold,
            plotters::style::FontStyle::Italic,
            plotters::style::FontStyle::Oblique,
        ] {
            let _ = plotters::style::register_font("sans-serif", style, FONT);
        }
    });
}
