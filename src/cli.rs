//! The command line: parse arguments, call the library, print. Every command is a library call
//! underneath (see each module's docs).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use clap::{Parser, Subcommand};

use crate::blocks::LogitsFor;
use crate::error::{Error, Result};
use crate::families::{self, LoadOptions, Vlm};
use crate::hooks::{HookCtx, HookSpec};
use crate::template::Message;

/// sycoscope: look inside vision-language models and find out why they give in to pushback.
#[derive(Parser, Debug)]
#[command(name = "sycoscope", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Model loading options shared by the commands that load a model.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// Checkpoint: a local folder in the Hugging Face layout, or a Hub id (owner/name[@rev]).
    #[arg(long)]
    pub model: String,
    /// Compute dtype: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Device: cpu, cuda[:N] (feature cuda) or metal (feature metal).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// List a model's hook names with their shapes.
    Hooks {
        #[command(flatten)]
        model: ModelArgs,
    },
    /// Run one forward and write the captured hooks (float32, batch-first) to a safetensors file.
    Capture {
        #[command(flatten)]
        model: ModelArgs,
        /// Image file(s), one per image part of the conversation.
        #[arg(long, num_args = 1..)]
        image: Vec<PathBuf>,
        /// Conversation: a JSON list of messages (Hugging Face format), or an object with `messages`.
        #[arg(long)]
        messages: PathBuf,
        /// Hooks to capture: names or globs with optional positions, e.g.
        /// `blocks.*.hook_resid_post@last,blocks.3.attn.hook_pattern@last,projector.hook_out`.
        #[arg(long, default_value = "")]
        hooks: String,
        /// Output file (.safetensors); a JSON sidecar with the prompt and span table is written beside it.
        #[arg(long)]
        out: PathBuf,
        /// Use the `pixel_values` tensor of this safetensors file instead of preprocessing the image.
        #[arg(long)]
        pixel_values: Option<PathBuf>,
        /// Do not append the assistant prefix after the last message.
        #[arg(long)]
        no_generation_prompt: bool,
    },
    /// Greedy generation for one image and a prompt.
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        image: PathBuf,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 32)]
        max_new_tokens: usize,
    },
    /// Draw a synthetic multiple-choice benchmark (images + items.jsonl) for a seed.
    SynthBench {
        #[arg(long, default_value_t = 240)]
        n: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long)]
        out: PathBuf,
        /// Image side in pixels.
        #[arg(long, default_value_t = 224)]
        size: u32,
        /// Tasks (comma-separated): color, shape, count, presence, position, size.
        #[arg(long, value_delimiter = ',')]
        tasks: Option<Vec<String>>,
        /// Option order: shuffled (default) or fixed (one order per task).
        #[arg(long, default_value = "shuffled")]
        option_order: String,
        /// Pixel noise amplitude (0 = clean).
        #[arg(long, default_value_t = 0)]
        noise: u8,
    },
    /// Run the MM-SY protocol (ask, push back, measure) on a benchmark; resumable.
    Eval(EvalArgs),
    /// Join shard runs (`eval --shard I/N`) into one run.
    Merge {
        /// Shard run directories.
        #[arg(num_args = 1..)]
        shards: Vec<PathBuf>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Layer-wise linear probes on a run's store: AUC per layer with folds, intervals and controls.
    Probe {
        #[arg(long)]
        run: PathBuf,
        /// Stored hooks to probe (glob).
        #[arg(long, default_value = "blocks.*.hook_resid_post@last")]
        hook: String,
        /// sycophantic, r1_correct, flipped, tone:<tone> or task:<task>.
        #[arg(long, default_value = "sycophantic")]
        label: String,
        #[arg(long, default_value_t = 5)]
        folds: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// L2 regularisation strength.
        #[arg(long, default_value_t = 1.0)]
        l2: f64,
        /// Bootstrap resamples for the interval.
        #[arg(long, default_value_t = 1000)]
        bootstrap: usize,
        /// Other runs whose curve for the same label is drawn on the same figure (e.g. the
        /// mitigated model); their probes must have been fitted already.
        #[arg(long, num_args = 1..)]
        compare: Vec<PathBuf>,
    },
    /// Attention analysis of a run: visual reliance per layer (neutral vs each tone) and heatmaps.
    Attention {
        #[arg(long)]
        run: PathBuf,
        /// Metrics: image_share, text_share, pressure_share, sink_share, ratio.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "image_share,ratio,pressure_share"
        )]
        metrics: Vec<String>,
        /// Example for the heatmaps (default: the first that gave in).
        #[arg(long)]
        example: Option<String>,
        /// Tone of the pressured heatmap.
        #[arg(long, default_value = "strong")]
        tone: String,
        /// Layers averaged in the neutral-vs-pressured heatmap (A..B, A-B, low, high, all).
        #[arg(long)]
        layers: Option<String>,
    },
    /// Attention-amplification sweep: eval for each lambda x layer range, with a table and a plot.
    Sweep {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        data: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, value_delimiter = ',', default_value = "0,0.3,0.6,0.9")]
        lambdas: Vec<f64>,
        /// Layer ranges: all, low, high, or A..B.
        #[arg(long, value_delimiter = ',', default_value = "all,low,high")]
        ranges: Vec<String>,
        #[arg(long)]
        limit: Option<usize>,
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "suggestive,euphemistic,strong"
        )]
        tones: Vec<String>,
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
        #[arg(long)]
        quiet: bool,
    },
    /// Run an experiment spec (probes/*.toml): data, eval + capture, probes, attention, figures.
    Run {
        spec: PathBuf,
        #[arg(long)]
        quiet: bool,
    },
    /// Export a Jupyter notebook that reloads a run and redraws its figures (numpy, pandas,
    /// matplotlib, safetensors only).
    ExportNotebook {
        #[arg(long)]
        run: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Write a self-contained HTML explorer of one example: heatmap per layer with a slider,
    /// tokens coloured by attention, logit-lens trajectories, probe scores, flip.
    Explore {
        /// Model to run (required unless --run is given; with --run it re-runs the example).
        #[arg(long)]
        model: Option<String>,
        #[arg(long, default_value = "f32")]
        dtype: String,
        #[arg(long)]
        image: Option<PathBuf>,
        /// The question (without options; they are appended as "A. x B. y ...").
        #[arg(long)]
        question: Option<String>,
        /// Option texts.
        #[arg(long, num_args = 1..)]
        options: Vec<String>,
        /// The user's pushback after the model's first answer.
        #[arg(long)]
        pushback: Option<String>,
        /// True option letter.
        #[arg(long)]
        answer: Option<char>,
        /// Pushed option letter.
        #[arg(long)]
        pushed: Option<char>,
        /// Probe weights (RUN/probes/<label>/weights.safetensors) to score each layer.
        #[arg(long)]
        probe: Option<PathBuf>,
        /// A run directory, with --example.
        #[arg(long)]
        run: Option<PathBuf>,
        #[arg(long)]
        example: Option<String>,
        /// Output .html file (or folder).
        #[arg(long)]
        out: PathBuf,
    },
    /// Train the model organism: a tiny LLaVA taught a planted sycophancy rule (the default model).
    TrainOrganism {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// A short run for CI (a loadable checkpoint, not the targets).
        #[arg(long)]
        quick: bool,
        /// Override the number of steps.
        #[arg(long)]
        steps: Option<usize>,
    },
    /// Write a seeded random-weight checkpoint (llava-hf layout) for demos and benchmarks.
    SynthModel {
        /// Architecture (llava).
        #[arg(long, default_value = "llava")]
        arch: String,
        #[arg(long, default_value_t = 4)]
        layers: usize,
        #[arg(long, default_value_t = 128)]
        hidden: usize,
        #[arg(long, default_value_t = 4)]
        heads: usize,
        /// Key/value heads (defaults to --heads).
        #[arg(long)]
        kv_heads: Option<usize>,
        /// MLP width (defaults to 2 x hidden... 11008/4096 ratio for large widths).
        #[arg(long)]
        intermediate: Option<usize>,
        #[arg(long, default_value_t = 3)]
        vision_layers: usize,
        #[arg(long, default_value_t = 64)]
        vision_hidden: usize,
        #[arg(long, default_value_t = 4)]
        vision_heads: usize,
        #[arg(long)]
        vision_intermediate: Option<usize>,
        #[arg(long, default_value_t = 84)]
        image_size: usize,
        #[arg(long, default_value_t = 14)]
        patch_size: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Weight dtype written: f32, f16 or bf16.
        #[arg(long, default_value = "f32")]
        dtype: String,
        #[arg(long)]
        out: PathBuf,
    },
}

/// Arguments of `eval`.
#[derive(clap::Args, Debug, Clone)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Benchmark: an MM-SY parquet file, a sycoscope items.jsonl (or its folder), or a Hub dataset id.
    #[arg(long)]
    pub data: String,
    /// Run directory (created; an interrupted run resumes).
    #[arg(long)]
    pub out: PathBuf,
    /// Tones (comma-separated): suggestive, euphemistic, strong.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "suggestive,euphemistic,strong"
    )]
    pub tones: Vec<String>,
    /// Only these tasks (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub tasks: Option<Vec<String>>,
    /// At most N items (after task filter and sharding).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Total rounds: 2 = ask + one pushback; more repeats the pushback.
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// A system prompt (the prompt-based mitigation).
    #[arg(long)]
    pub system_prompt: Option<String>,
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Evaluate shard I of N (deterministic split), e.g. 0/4.
    #[arg(long)]
    pub shard: Option<String>,
    /// Stop at the first bad row instead of skipping it.
    #[arg(long)]
    pub strict: bool,
    /// Capture activations into RUN/store: `default` or a hook list.
    #[arg(long)]
    pub capture: Option<String>,
    /// Amplify attention to image tokens: z' = z + lambda |z| on image columns of the decision row.
    #[arg(long)]
    pub amplify: Option<f64>,
    /// Layers to amplify: A..B (end exclusive), A-B, low, high or all.
    #[arg(long, default_value = "high")]
    pub amplify_layers: String,
    /// Amplification rule: add_abs (z + lambda |z|) or scale (lambda z).
    #[arg(long, default_value = "add_abs")]
    pub amplify_rule: String,
    /// Re-encode the whole conversation for round 2 instead of extending the round-1 cache.
    #[arg(long)]
    pub no_prefix_reuse: bool,
    /// MM-SY column names, e.g. `question=prompt,solid_response=strong_text`.
    #[arg(long)]
    pub columns: Option<String>,
    /// Hide the progress bar.
    #[arg(long)]
    pub quiet: bool,
}

impl EvalArgs {
    /// The protocol options these arguments give, for a model of `n_layers` layers.
    pub fn options(&self, n_layers: usize) -> Result<crate::protocol::runner::EvalOptions> {
        use crate::protocol::runner::{parse_layer_range, parse_shard, Amplify, EvalOptions};
        let tones = self
            .tones
            .iter()
            .map(|t| t.parse::<crate::protocol::items::Tone>())
            .collect::<Result<Vec<_>>>()?;
        if self.rounds < 1 {
            return Err(Error::input("--rounds must be at least 1"));
        }
        let amplify = match self.amplify {
            None => None,
            Some(l) => Some(Amplify {
                lambda: l,
                layers: parse_layer_range(&self.amplify_layers, n_layers)
                    .map_err(|e| Error::input(format!("--amplify-layers: {e}")))?,
                rule: self.amplify_rule.clone(),
            }),
        };
        Ok(EvalOptions {
            tones: if self.rounds < 2 { vec![] } else { tones },
            tasks: self.tasks.clone(),
            limit: self.limit,
            rounds: self.rounds.max(2),
            system_prompt: self.system_prompt.clone(),
            batch_size: self.batch_size.max(1),
            shard: self.shard.as_deref().map(parse_shard).transpose()?,
            strict: self.strict,
            capture: self.capture.clone(),
            amplify,
            prefix_reuse: !self.no_prefix_reuse,
            seed: 0,
        })
    }

    /// Loader options (column map, strictness).
    pub fn load_options(&self) -> Result<crate::protocol::items::LoadOptions> {
        let mut lo = crate::protocol::items::LoadOptions {
            strict: self.strict,
            ..Default::default()
        };
        if let Some(c) = &self.columns {
            for pair in c.split(',').filter(|s| !s.is_empty()) {
                let (k, v) = pair.split_once('=').ok_or_else(|| {
                    Error::input(format!("--columns: '{pair}' is not KEY=COLUMN"))
                })?;
                let cm = &mut lo.columns;
                let slot = match k.trim() {
                    "image" => &mut cm.image,
                    "question" => &mut cm.question,
                    "answer" => &mut cm.answer,
                    "true_option" => &mut cm.true_option,
                    "sy_option" => &mut cm.sy_option,
                    "suggest_response" | "suggestive" => &mut cm.suggestive,
                    "gentle_response" | "euphemistic" => &mut cm.euphemistic,
                    "solid_response" | "strong" => &mut cm.strong,
                    "id" => {
                        cm.id = Some(v.trim().to_string());
                        continue;
                    }
                    "task" => {
                        cm.task = Some(v.trim().to_string());
                        continue;
                    }
                    other => {
                        return Err(Error::input(format!("--columns: unknown field '{other}'")))
                    }
                };
                *slot = v.trim().to_string();
            }
        }
        Ok(lo)
    }
}

/// Run `eval` and print the summary table.
pub fn run_eval(a: &EvalArgs) -> Result<crate::protocol::metrics::Summary> {
    let m = a.model.load()?;
    let opts = a.options(m.info().n_layers)?;
    let job = crate::protocol::runner::EvalJob {
        model_source: &a.model.model,
        data: &a.data,
        run: &a.out,
        opts,
        load: a.load_options()?,
        progress: !a.quiet,
    };
    let t0 = std::time::Instant::now();
    let s = crate::protocol::runner::eval(m.as_ref(), &job)?;
    println!("{}", s.table());
    println!(
        "run written to {} in {:.1} s",
        a.out.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(s)
}

/// Parse a device string.
pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        s if s.starts_with("cuda") => {
            let n = s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            Device::new_cuda(n).map_err(|e| {
                Error::input(format!("device '{s}': {e} (build with --features cuda)"))
            })
        }
        "metal" => Device::new_metal(0).map_err(|e| {
            Error::input(format!("device 'metal': {e} (build with --features metal)"))
        }),
        other => Err(Error::input(format!(
            "unknown device '{other}': expected cpu, cuda[:N] or metal"
        ))),
    }
}

impl ModelArgs {
    /// Load the model these arguments name.
    pub fn load(&self) -> Result<Box<dyn Vlm>> {
        let opts = LoadOptions {
            dtype: crate::blocks::weights::parse_dtype(&self.dtype)?,
            device: parse_device(&self.device)?,
        };
        families::load(&self.model, &opts)
    }
}

/// Run the CLI; returns the process exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    match run(cli.command) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

/// Execute one command.
pub fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::Hooks { model } => {
            let m = model.load()?;
            let info = m.info();
            println!(
                "{} ({}): {} LM layers, width {}, {} heads, vocab {}; {} vision layers",
                info.dir.display(),
                info.family,
                info.n_layers,
                info.d_model,
                info.n_heads,
                info.vocab_size,
                info.vision_layers
            );
            for hp in m.hook_points() {
                println!("{:<44} {}", hp.to_string(), m.hook_shape(&hp));
            }
            Ok(())
        }
        Command::Capture {
            model,
            image,
            messages,
            hooks,
            out,
            pixel_values,
            no_generation_prompt,
        } => {
            let m = model.load()?;
            capture(
                m.as_ref(),
                &image,
                &messages,
                &hooks,
                &out,
                pixel_values.as_deref(),
                !no_generation_prompt,
            )
        }
        Command::Generate {
            model,
            image,
            prompt,
            max_new_tokens,
        } => {
            let m = model.load()?;
            let img = crate::preprocess::load_image(&image)?;
            let msgs = vec![Message::user_with_image(&prompt)];
            let p = m.prepare(&msgs, &[img], true)?;
            let ids = families::generate_greedy(m.as_ref(), &p, max_new_tokens, 0)?;
            let text = m
                .tokenizer()
                .decode(&ids, true)
                .map_err(|e| Error::msg(format!("decoding failed: {e}")))?;
            println!("{}", p.prompt_text);
            println!("{text}");
            Ok(())
        }
        Command::SynthBench {
            n,
            seed,
            out,
            size,
            tasks,
            option_order,
            noise,
        } => {
            use crate::protocol::synth::{write_bench, OptionOrder, SynthConfig, Task};
            let mut cfg = SynthConfig {
                n,
                seed,
                size,
                noise,
                ..Default::default()
            };
            if let Some(t) = tasks {
                cfg.tasks = t.iter().map(|x| x.parse::<Task>()).collect::<Result<_>>()?;
            }
            cfg.option_order = match option_order.as_str() {
                "shuffled" => OptionOrder::Shuffled,
                "fixed" | "fixed-per-task" => OptionOrder::FixedPerTask,
                other => {
                    return Err(Error::input(format!(
                        "--option-order '{other}': expected shuffled or fixed"
                    )))
                }
            };
            let p = write_bench(&cfg, &out)?;
            println!("wrote {n} items to {}", p.display());
            Ok(())
        }
        Command::Eval(a) => run_eval(&a).map(|_| ()),
        Command::Merge { shards, out } => {
            let s = crate::protocol::runner::merge(&shards, &out)?;
            println!("{}", s.table());
            println!("merged {} shard runs into {}", shards.len(), out.display());
            Ok(())
        }
        Command::Probe {
            run,
            hook,
            label,
            folds,
            seed,
            l2,
            bootstrap,
            compare,
        } => {
            let cfg = crate::probes::ProbeConfig {
                folds,
                seed,
                l2,
                bootstrap,
                ..Default::default()
            };
            let mut c = crate::pipeline::probe_run(&run, &hook, &label, &cfg)?;
            print!("{}", crate::pipeline::probe_table(&c));
            if !compare.is_empty() {
                let dirname = label.replace([':', '/'], "_");
                c.label = format!("{} ({})", label, run.display());
                let mut others = Vec::new();
                for o in &compare {
                    let mut oc = crate::probes::ProbeCurve::load(&o.join("probes").join(&dirname))?;
                    oc.label = format!("{} ({})", label, o.display());
                    others.push(oc);
                }
                let mut all: Vec<&crate::probes::ProbeCurve> = vec![&c];
                all.extend(others.iter());
                let stem = run.join("probes").join(&dirname).join("compare");
                for f in crate::plots::plot_probe_curves(&all, &stem)? {
                    println!("wrote {}", f.display());
                }
            }
            println!(
                "wrote {}",
                run.join("probes")
                    .join(label.replace([':', '/'], "_"))
                    .display()
            );
            Ok(())
        }
        Command::Attention {
            run,
            metrics,
            example,
            tone,
            layers,
        } => {
            let m: Vec<&str> = metrics.iter().map(|s| s.as_str()).collect();
            let mut files = crate::pipeline::attention_curves(&run, &m)?;
            let n_layers = crate::pipeline::read_manifest(&run)?.n_layers;
            let l = layers
                .as_deref()
                .map(|s| crate::protocol::runner::parse_layer_range(s, n_layers))
                .transpose()?;
            files.extend(crate::pipeline::attention_heatmaps(
                &run,
                example.as_deref(),
                &tone,
                l,
            )?);
            for f in files {
                println!("wrote {}", f.display());
            }
            Ok(())
        }
        Command::Sweep {
            model,
            data,
            out,
            lambdas,
            ranges,
            limit,
            tones,
            batch_size,
            quiet,
        } => {
            let m = model.load()?;
            let tones = tones
                .iter()
                .map(|t| t.parse())
                .collect::<Result<Vec<_>>>()?;
            let base = crate::protocol::runner::EvalOptions {
                tones,
                limit,
                batch_size,
                ..Default::default()
            };
            let rows = crate::pipeline::sweep(
                m.as_ref(),
                &model.model,
                &data,
                &out,
                &lambdas,
                &ranges,
                &base,
                &Default::default(),
                !quiet,
            )?;
            print!("{}", crate::pipeline::sweep_table(&rows));
            println!("wrote {}", out.join("sweep.csv").display());
            Ok(())
        }
        Command::Run { spec, quiet } => {
            let t0 = std::time::Instant::now();
            let (run, report) = crate::pipeline::run_spec(&spec, !quiet)?;
            print!("{report}");
            println!(
                "run written to {} in {:.1} s",
                run.display(),
                t0.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Command::ExportNotebook { run, out } => {
            let p = crate::export::export_notebook(&run, &out)?;
            println!("wrote {}", p.display());
            Ok(())
        }
        Command::Explore {
            model,
            dtype,
            image,
            question,
            options,
            pushback,
            answer,
            pushed,
            probe,
            run,
            example,
            out,
        } => {
            let load = |m: &str| {
                ModelArgs {
                    model: m.to_string(),
                    dtype: dtype.clone(),
                    device: "cpu".into(),
                }
                .load()
            };
            let p = if let Some(run) = run {
                let id = example.ok_or_else(|| Error::input("explore --run needs --example ID"))?;
                let m = model.as_deref().map(load).transpose()?;
                crate::explorer::explore_run(&run, &id, m.as_deref(), &out)?
            } else {
                let m = load(model.as_deref().ok_or_else(|| {
                    Error::input("explore needs --model (or --run RUN --example ID)")
                })?)?;
                let img_path = image.ok_or_else(|| Error::input("explore needs --image"))?;
                let q = question.ok_or_else(|| Error::input("explore needs --question"))?;
                if options.len() < 2 {
                    return Err(Error::input("explore needs at least two --options"));
                }
                let letter = |c: Option<char>, what: &str| -> Result<Option<usize>> {
                    match c {
                        None => Ok(None),
                        Some(c) => {
                            let i = (c.to_ascii_uppercase() as u8).wrapping_sub(b'A') as usize;
                            if i < options.len() {
                                Ok(Some(i))
                            } else {
                                Err(Error::input(format!(
                                    "--{what} {c}: not one of the {} option letters",
                                    options.len()
                                )))
                            }
                        }
                    }
                };
                let listed: Vec<String> = options
                    .iter()
                    .enumerate()
                    .map(|(i, o)| format!("{}. {o}", crate::protocol::items::Item::letter(i)))
                    .collect();
                let input = crate::explorer::ExploreInput {
                    image: crate::preprocess::load_image(&img_path)?,
                    question: format!(
                        "{q}\n{}\nAnswer with the option's letter from the given choices directly.",
                        listed.join("\n")
                    ),
                    options: options.clone(),
                    answer: letter(answer, "answer")?,
                    pushed: letter(pushed, "pushed")?,
                    pushback: pushback.ok_or_else(|| Error::input("explore needs --pushback"))?,
                    title: q.clone(),
                    probe: probe
                        .as_deref()
                        .map(crate::probes::ProbeWeights::load_safetensors)
                        .transpose()?,
                };
                crate::explorer::explore_model(m.as_ref(), &input, &out)?
            };
            println!("wrote {}", p.display());
            Ok(())
        }
        Command::TrainOrganism {
            out,
            seed,
            quick,
            steps,
        } => {
            let mut cfg = if quick {
                crate::organism::OrganismConfig::quick(seed)
            } else {
                crate::organism::OrganismConfig::full(seed)
            };
            if let Some(s) = steps {
                cfg.steps = s;
                cfg.r1_steps = cfg.r1_steps.min(s / 2);
            }
            let report = crate::organism::train_organism(&out, &cfg, true)?;
            println!("{}", report.summary());
            println!("wrote the organism to {}", out.display());
            Ok(())
        }
        Command::SynthModel {
            arch,
            layers,
            hidden,
            heads,
            kv_heads,
            intermediate,
            vision_layers,
            vision_hidden,
            vision_heads,
            vision_intermediate,
            image_size,
            patch_size,
            seed,
            dtype,
            out,
        } => {
            if arch != "llava" {
                return Err(Error::input(format!(
                    "synth-model: unknown --arch '{arch}' (supported: llava)"
                )));
            }
            let c = crate::synth_model::SynthLlavaConfig {
                layers,
                hidden,
                heads,
                kv_heads: kv_heads.unwrap_or(heads),
                intermediate: intermediate.unwrap_or(if hidden >= 1024 {
                    hidden * 11008 / 4096
                } else {
                    hidden * 2
                }),
                vision_layers,
                vision_hidden,
                vision_heads,
                vision_intermediate: vision_intermediate.unwrap_or(vision_hidden * 4),
                image_size,
                patch_size,
                seed,
                init_std: 0.02,
            };
            let dt = crate::blocks::weights::parse_dtype(&dtype)?;
            crate::synth_model::write_llava(&out, &c, dt)?;
            println!(
                "wrote a random-weight LLaVA checkpoint to {} (seed {seed})",
                out.display()
            );
            Ok(())
        }
    }
}

/// One forward with captures, written to `out` (safetensors) plus `out.json` (prompt, spans,
/// shapes).
pub fn capture(
    m: &dyn Vlm,
    images: &[PathBuf],
    messages: &Path,
    hooks: &str,
    out: &Path,
    pixel_values: Option<&Path>,
    add_generation_prompt: bool,
) -> Result<()> {
    let text = crate::error::read_to_string(messages)?;
    let msgs = crate::template::parse_messages(&text, messages)?;
    let imgs: Vec<_> = images
        .iter()
        .map(|p| crate::preprocess::load_image(p))
        .collect::<Result<_>>()?;
    let mut p = m.prepare(&msgs, &imgs, add_generation_prompt)?;
    if let Some(pv) = pixel_values {
        let t = candle_core::safetensors::load(pv, &Device::Cpu)
            .map_err(|e| Error::input(format!("{}: {e}", pv.display())))?;
        let pv_t = t.get("pixel_values").ok_or_else(|| {
            Error::input(format!(
                "{}: no 'pixel_values' tensor (found: {})",
                pv.display(),
                t.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })?;
        m.set_pixel_values(&mut p, pv_t.clone())?;
    }
    let spec = HookSpec::parse_captures(hooks)?;
    let resolved = spec.resolve(&m.hook_points())?;
    let mut ctx = HookCtx::new(&resolved, vec![]);
    let logits = m.forward(&[&p], &mut ctx, LogitsFor::All, None)?;
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (k, t) in &ctx.captures.tensors {
        tensors.push((k.clone(), t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?));
    }
    let ids: Vec<i64> = p.ids.iter().map(|&x| x as i64).collect();
    tensors.push((
        "input_ids".into(),
        Tensor::from_vec(ids, (1, p.ids.len()), &Device::Cpu)?,
    ));
    tensors.push((
        "logits".into(),
        logits.to_dtype(DType::F32)?.to_device(&Device::Cpu)?,
    ));
    let tmp = crate::error::tmp_path(out);
    if let Some(d) = out.parent() {
        if !d.as_os_str().is_empty() {
            std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
        }
    }
    let shapes: serde_json::Map<String, serde_json::Value> = tensors
        .iter()
        .map(|(k, t)| (k.clone(), serde_json::json!(t.dims())))
        .collect();
    candle_core::safetensors::save(&tensors.into_iter().collect(), &tmp)?;
    std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))?;
    let side = serde_json::json!({
        "model": m.info().dir,
        "prompt_text": p.prompt_text,
        "spans": p.spans,
        "shapes": shapes,
    });
    crate::error::write_atomic(
        out.with_extension("json"),
        &serde_json::to_vec_pretty(&side).unwrap_or_default(),
    )?;
    println!("{}", p.prompt_text);
    println!(
        "{} tokens, image span(s): {}",
        p.ids.len(),
        p.spans
            .images
            .iter()
            .map(|s| format!("[{}, {}) {}x{}", s.start, s.end, s.rows, s.cols))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for (k, v) in &shapes {
        println!("  {k:<44} {v}");
    }
    println!(
        "wrote {} and {}",
        out.display(),
        out.with_extension("json").display()
    );
    Ok(())
}
