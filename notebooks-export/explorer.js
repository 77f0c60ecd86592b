// sycoscope explorer page script (inlined by src/explorer.rs). Reads the JSON in #data and
// inserts every dataset text with textContent (never as markup).
(function () {
  'use strict';
  var D = JSON.parse(document.getElementById('data').textContent);
  var NS = 'http://www.w3.org/2000/svg';
  var convs = D.conversations || [];
  var A = convs[0];
  var B = convs.length > 1 ? convs[1] : null;
  var L = Math.max(1, D.n_layers | 0);
  var hasLayers = (D.n_layers | 0) > 0;

  function $(id) { return document.getElementById(id); }
  function el(tag, text, cls) {
    var e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }
  function svgEl(tag, attrs) {
    var e = document.createElementNS(NS, tag);
    for (var k in attrs) if (Object.prototype.hasOwnProperty.call(attrs, k)) e.setAttribute(k, attrs[k]);
    return e;
  }
  function letter(i) { return String.fromCharCode(65 + i); }
  function pct(x) { return (x === null || x === undefined) ? '-' : (100 * x).toFixed(1) + '%'; }

  // ---- header ----------------------------------------------------------------------------
  $('source').textContent = D.source || '';
  $('question').textContent = D.question || '';
  (D.notes || []).forEach(function (n) { $('notes').appendChild(el('li', n)); });

  function fillOptions() {
    var tb = $('options').tBodies[0];
    tb.textContent = '';
    (D.options || []).forEach(function (o, i) {
      var tr = el('tr');
      tr.appendChild(el('td', letter(i)));
      tr.appendChild(el('td', o));
      tr.appendChild(el('td', A && A.probs ? pct(A.probs[i]) : '-'));
      tr.appendChild(el('td', B && B.probs ? pct(B.probs[i]) : '-'));
      var tags = el('td');
      if (D.answer === i) tags.appendChild(el('span', 'true', 'tag true'));
      if (D.pushed === i) tags.appendChild(el('span', 'pushed', 'tag pushed'));
      if (A && A.choice === i) tags.appendChild(el('span', 'neutral choice', 'tag'));
      if (B && B.choice === i) tags.appendChild(el('span', 'pressured choice', 'tag'));
      tr.appendChild(tags);
      tb.appendChild(tr);
    });
  }

  function fillVerdict() {
    var v = $('verdict');
    v.textContent = '';
    if (!B) { v.appendChild(el('span', 'no pressured conversation in this page')); return; }
    var txt, cls;
    if (B.flipped === null || B.flipped === undefined) { txt = 'unknown (no recorded outcome)'; cls = ''; }
    else if (B.branch === 'off-protocol') {
      txt = B.flipped ? 'moved to the pushed option (round 1 was already wrong: not a sycophancy test)'
                      : 'kept its (wrong) round-1 answer; round 1 was already wrong, so this is not a sycophancy test';
      cls = '';
    }
    else if (B.branch === 'correction') {
      txt = B.flipped ? 'yes: the model accepted the correction' : 'no: the model kept its wrong answer';
      cls = B.flipped ? 'verdict-no' : 'verdict-yes';
    } else {
      txt = B.flipped ? 'yes: under pressure the model prefers the pushed option' : 'no: the model held its answer';
      cls = B.flipped ? 'verdict-yes' : 'verdict-no';
    }
    v.appendChild(el('span', txt, cls));
    var detail = ' (neutral choice ' + (A.choice !== null && A.choice !== undefined ? letter(A.choice) : '-') +
      ', pressured choice ' + (B.choice !== null && B.choice !== undefined ? letter(B.choice) : '-') +
      (B.branch ? ', ' + B.branch + ' branch' : '') + ')';
    v.appendChild(el('span', detail, 'note'));
    $('followup').textContent = B.followup || '';
    $('cap-b').textContent = B.label || 'pressured';
    $('tok-cap-b').textContent = B.label || 'pressured';
  }

  var sel = $('cond');
  convs.slice(1).forEach(function (c, i) {
    var o = el('option', c.label || c.condition);
    o.value = String(i + 1);
    sel.appendChild(o);
  });
  sel.disabled = convs.length <= 2;

  // ---- tokens ------------------------------------------------------------------------------
  function buildTokens(box, conv) {
    box.textContent = '';
    var spans = [];
    if (!conv || !conv.tokens || !conv.tokens.length) {
      box.appendChild(el('p', conv ? 'token-level attention is not stored in runs; re-run this example with a model to see it' : 'no conversation', 'note'));
      return spans;
    }
    var frag = document.createDocumentFragment();
    conv.tokens.forEach(function (t) {
      var s = el('span', t.t, 'tok ' + t.k);
      s._base = t.t;
      s._kind = t.k;
      frag.appendChild(s);
      spans.push(s);
    });
    box.appendChild(frag);
    return spans;
  }
  function colourTokens(spans, row) {
    if (!spans.length || !row) return;
    var m = 0;
    for (var i = 1; i < row.length; i++) {
      if (spans[i]._kind !== 'image' && row[i] > m) m = row[i];
    }
    if (m <= 0) m = 1;
    for (var j = 0; j < spans.length; j++) {
      var v = row[j] || 0;
      var s = spans[j];
      if (s._kind === 'image') {
        s.textContent = s._base + ' ' + pct(v);
        s.style.backgroundColor = 'rgba(60,170,110,' + Math.min(1, v).toFixed(3) + ')';
      } else {
        s.style.backgroundColor = 'rgba(255,140,0,' + Math.min(1, v / m).toFixed(3) + ')';
      }
      s.title = (100 * v).toFixed(2) + '% of the decision token\'s attention';
    }
  }

  // ---- charts ------------------------------------------------------------------------------
  var W = 620, H = 280, ML = 44, MR = 190, MT = 12, MB = 34;
  function xOf(l) { return ML + (L > 1 ? l / (L - 1) : 0.5) * (W - ML - MR); }
  function yOf(v) { return MT + (1 - v) * (H - MT - MB); }
  function chart(svg, series, ylabel) {
    svg.textContent = '';
    svg.appendChild(svgEl('rect', { x: ML, y: MT, width: W - ML - MR, height: H - MT - MB, fill: 'none', stroke: '#bbb' }));
    [0, 0.25, 0.5, 0.75, 1].forEach(function (t) {
      svg.appendChild(svgEl('line', { x1: ML, x2: W - MR, y1: yOf(t), y2: yOf(t), stroke: '#eee' }));
      var tx = svgEl('text', { x: ML - 6, y: yOf(t) + 4, 'text-anchor': 'end' });
      tx.textContent = t.toFixed(2);
      svg.appendChild(tx);
    });
    var step = Math.max(1, Math.ceil(L / 10));
    for (var l = 0; l < L; l += step) {
      var tx = svgEl('text', { x: xOf(l), y: H - MB + 14, 'text-anchor': 'middle' });
      tx.textContent = String(l);
      svg.appendChild(tx);
    }
    var xl = svgEl('text', { x: (ML + W - MR) / 2, y: H - 4, 'text-anchor': 'middle' });
    xl.textContent = 'layer';
    svg.appendChild(xl);
    var yl = svgEl('text', { x: 12, y: (MT + H - MB) / 2, 'text-anchor': 'middle', transform: 'rotate(-90 12 ' + ((MT + H - MB) / 2) + ')' });
    yl.textContent = ylabel;
    svg.appendChild(yl);
    var ly = MT + 4;
    series.forEach(function (s) {
      var pts = [];
      s.values.forEach(function (v, i) { if (v !== null && v !== undefined) pts.push(xOf(i).toFixed(1) + ',' + yOf(v).toFixed(1)); });
      if (!pts.length) return;
      svg.appendChild(svgEl('polyline', { points: pts.join(' '), fill: 'none', stroke: s.color, 'stroke-width': s.width, 'stroke-dasharray': s.dash || 'none' }));
      if (s.legend) {
        svg.appendChild(svgEl('line', { x1: W - MR + 8, x2: W - MR + 30, y1: ly + 4, y2: ly + 4, stroke: s.color, 'stroke-width': s.width, 'stroke-dasharray': s.dash || 'none' }));
        var t = svgEl('text', { x: W - MR + 34, y: ly + 8 });
        t.textContent = s.name;
        svg.appendChild(t);
        ly += 15;
      }
    });
    var cur = svgEl('line', { x1: xOf(0), x2: xOf(0), y1: MT, y2: H - MB, stroke: '#333', 'stroke-dasharray': '2 3' });
    svg.appendChild(cur);
    return cur;
  }

  function lensSeries() {
    var out = [];
    [[A, '', 'neutral'], [B, '6 4', 'pressured']].forEach(function (cd) {
      var c = cd[0];
      if (!c || !c.lens || !c.lens.length) return;
      var n = c.lens[0].length;
      for (var o = 0; o < n; o++) {
        var key = o === D.answer ? 'true' : (o === D.pushed ? 'pushed' : null);
        out.push({
          values: c.lens.map(function (r) { return r[o]; }),
          color: key === 'true' ? '#1a9850' : (key === 'pushed' ? '#d73027' : '#aaa'),
          width: key ? 2.5 : 1,
          dash: cd[1],
          name: letter(o) + (key ? ' (' + key + ')' : '') + ', ' + cd[2],
          legend: key !== null || n <= 4
        });
      }
    });
    return out;
  }
  function probeSeries() {
    var out = [];
    [[A, '', 'neutral', '#2166ac'], [B, '6 4', 'pressured', '#b2182b']].forEach(function (cd) {
      var c = cd[0];
      if (!c || !c.probe || !c.probe.length) return;
      out.push({ values: c.probe, color: cd[3], width: 2, dash: cd[1], name: cd[2], legend: true });
    });
    return out;
  }

  // ---- state -------------------------------------------------------------------------------
  var slider = $('layer');
  slider.max = String(L - 1);
  slider.value = String(L - 1);
  slider.disabled = !hasLayers;
  var spansA = buildTokens($('tokens-a'), A);
  var spansB = [];
  var lensCursor = null, probeCursor = null;

  function buildB() {
    spansB = buildTokens($('tokens-b'), B);
    fillOptions();
    fillVerdict();
    var ls = lensSeries();
    if (ls.length) {
      $('lens-note').textContent = '';
      $('lens').style.display = '';
      lensCursor = chart($('lens'), ls, 'P(option)');
    } else {
      $('lens-note').textContent = 'no logit lens in this data (the store has no logit_lens.options)';
      $('lens').style.display = 'none';
      lensCursor = null;
    }
    var ps = probeSeries();
    if (D.probe_label && ps.length) {
      $('probe-note').textContent = 'probe "' + D.probe_label + '": probability of the label from each layer\'s residual at the decision token';
      $('probe').style.display = '';
      probeCursor = chart($('probe'), ps, 'P(' + D.probe_label + ')');
    } else {
      $('probe-note').textContent = 'no probes in this run';
      $('probe').style.display = 'none';
      probeCursor = null;
    }
  }

  function showHeat(img, note, share, conv, layer) {
    var src = conv && conv.heat ? conv.heat[layer] : null;
    if (src) {
      if (img.getAttribute('src') !== src) img.setAttribute('src', src);
      img.style.display = '';
      note.textContent = '';
    } else {
      img.removeAttribute('src');
      img.style.display = 'none';
      note.textContent = conv ? (conv.heat_note || 'no heatmap for this layer') : 'no conversation';
    }
    var sh = conv && conv.share ? conv.share[layer] : null;
    share.textContent = (sh === null || sh === undefined) ? '' : 'image share of the decision token\'s attention: ' + pct(sh);
  }

  function update() {
    var layer = Math.min(L - 1, Math.max(0, parseInt(slider.value, 10) || 0));
    $('layer-label').textContent = hasLayers ? String(layer) + ' / ' + String(L - 1) : 'none';
    showHeat($('heat-a'), $('heat-a-note'), $('share-a'), A, layer);
    showHeat($('heat-b'), $('heat-b-note'), $('share-b'), B, layer);
    colourTokens(spansA, A && A.attn ? A.attn[layer] : null);
    colourTokens(spansB, B && B.attn ? B.attn[layer] : null);
    [lensCursor, probeCursor].forEach(function (c) {
      if (c) { c.setAttribute('x1', xOf(layer)); c.setAttribute('x2', xOf(layer)); }
    });
  }

  sel.addEventListener('change', function () { B = convs[parseInt(sel.value, 10)] || null; buildB(); update(); });
  slider.addEventListener('input', update);
  buildB();
  update();

  // ---- self-test (?selftest=1) -------------------------------------------------------------
  function fire() { slider.dispatchEvent(new Event('input')); }
  function selftest() {
    var out = {};
    var img = $('heat-a');
    slider.value = '0'; fire();
    var a = img.getAttribute('src');
    var tokA = spansA.length > 1 ? spansA[1].style.backgroundColor : null;
    slider.value = String(L - 1); fire();
    var b = img.getAttribute('src');
    out.slider = L < 2 ? 'slider-single-layer' : (a && b && a !== b ? 'slider-ok' : 'slider-fail');
    out.label = $('layer-label').textContent;
    out.tokens_changed = spansA.length > 1 ? (tokA !== spansA[1].style.backgroundColor) : null;
    var n = 60;
    var t0 = performance.now();
    for (var i = 0; i < n; i++) {
      slider.value = String(i % L); fire();
      void document.body.offsetHeight;
    }
    out.ms_per_move = (performance.now() - t0) / n;
    out.nodes = document.getElementsByTagName('*').length;
    out.scripts = document.scripts.length;
    out.pwned = !!window.__pwned;
    out.question_ok = $('question').textContent === (D.question || '');
    out.probe_note = $('probe-note').textContent;
    out.lens_lines = $('lens').getElementsByTagName('polyline').length;
    out.heat_count = (A && A.heat ? A.heat.filter(function (h) { return !!h; }).length : 0);
    out.errors = window.__errs.length;
    out.errlist = window.__errs.slice(0, 5);
    var pre = $('selftest');
    pre.hidden = false;
    pre.textContent = 'SELFTEST ' + JSON.stringify(out);
  }
  if (/[?&]selftest=1/.test(location.search)) setTimeout(selftest, 0);
})();
