//! `steer eval`: a fixed prompt set (every ordered pair of objects x every relation x seeds),
//! generated unsteered and with each steering loss from the same initial noise, scored by the
//! detector: object presence, the unnamed-colour control, position accuracy overall and per
//! relation, and seconds per image.
//!
//! Works for any pipeline the crate loads whose images the ShapesWorld [`Detector`] can read; a
//! method is a name, an optional [`MapLoss`] and its loop settings.

use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;

use crate::image::{from_rgb8, to_rgb8};
use crate::pipelines::{GenerateRequest, StableDiffusion};
use crate::shapes::detect::{Detector, Verdict};
use crate::shapes::world::{caption, OBJECTS};
use crate::steering::centroid::CentroidLoss;
use crate::steering::classifier::RelationClassifier;
use crate::steering::prompt::Relation;
use crate::steering::refine::{MapLoss, Steerer, SteeringConfig, SteeringTarget};
use crate::{DType, Error, Result, Tensor};

/// One prompt and seed of the set.
#[derive(Clone, Debug)]
pub struct EvalCase {
    pub subject: usize,
    pub relation: Relation,
    pub object: usize,
    pub seed: u64,
}

impl EvalCase {
    pub fn prompt(&self) -> String {
        caption(
            OBJECTS[self.subject].name,
            self.relation,
            OBJECTS[self.object].name,
        )
    }
}

/// Every ordered pair of different objects, in every relation, with seeds `0..seeds`:
/// 6 x 4 = 24 prompts for ShapesWorld's three objects.
pub fn cases(seeds: u64) -> Vec<EvalCase> {
    let mut out = Vec::new();
    for seed in 0..seeds {
        for subject in 0..OBJECTS.len() {
            for object in (0..OBJECTS.len()).filter(|&o| o != subject) {
                for relation in Relation::ALL {
                    out.push(EvalCase {
                        subject,
                        relation,
                        object,
                        seed,
                    });
                }
            }
        }
    }
    out
}

/// One way of generating: unsteered (`loss` None) or steered by a loss.
pub struct Method<'a> {
    pub name: String,
    pub loss: Option<&'a (dyn MapLoss + Sync)>,
    /// The loss's class order (`None` for classes that are not relations, such as "is").
    pub classes: Vec<Option<Relation>>,
    pub config: SteeringConfig,
}

/// The sampler's and the steering loop's settings; the defaults are ShapesWorld's.
#[derive(Clone, Debug, Serialize)]
pub struct EvalSettings {
    /// DDIM steps.
    pub steps: usize,
    pub guidance: f64,
    /// Steer denoising steps 0..N.
    pub steer_steps: usize,
    /// Refinement passes after the first, per steered step.
    pub max_refinements: usize,
    /// The learned classifiers' gradient step on the latent.
    pub step_size: f64,
    /// The centroid loss's gradient step on the latent.
    pub centroid_step_size: f64,
}

impl Default for EvalSettings {
    fn default() -> Self {
        EvalSettings {
            steps: 50,
            guidance: 3.0,
            // Tuned on 12 prompts (`--limit 12`), not the SPEC's SD2.1 numbers (0..25, 15, 5):
            // a 32x32 pixel model moves further per step, and fewer passes keep the eval cheap.
            steer_steps: 15,
            max_refinements: 5,
            step_size: 10.0,
            centroid_step_size: 20.0,
        }
    }
}

impl EvalSettings {
    fn steering(&self, step_size: f64) -> SteeringConfig {
        SteeringConfig {
            step_size,
            max_refinements: self.max_refinements,
            steps: 0..self.steer_steps,
            ..SteeringConfig::default()
        }
    }
}

fn relations_of(classifier: &RelationClassifier) -> Vec<Option<Relation>> {
    classifier
        .classes()
        .iter()
        .map(|c| Relation::from_name(c))
        .collect()
}

/// The eval's methods: unsteered; steered by the learned (dual-inversion) classifier, by the
/// hand-crafted centroid loss, and by a single-inversion classifier (the shortcut ablation).
pub fn methods<'a>(
    settings: &EvalSettings,
    learned: Option<&'a RelationClassifier>,
    centroid: &'a CentroidLoss,
    single: Option<&'a RelationClassifier>,
) -> Vec<Method<'a>> {
    let mut out = vec![Method {
        name: "unsteered".into(),
        loss: None,
        classes: Vec::new(),
        config: settings.steering(0.0),
    }];
    let classifier = |name: &str, c: &'a RelationClassifier| Method {
        name: name.into(),
        loss: Some(c),
        classes: relations_of(c),
        config: settings.steering(settings.step_size),
    };
    if let Some(c) = learned {
        out.push(classifier("learned classifier", c));
    }
    out.push(Method {
        name: "hand-crafted (centroid)".into(),
        loss: Some(centroid),
        classes: centroid.classes.iter().copied().map(Some).collect(),
        // The hinge is 0 once the relation holds: stop there.
        config: SteeringConfig {
            loss_targets: vec![0.0],
            ..settings.steering(settings.centroid_step_size)
        },
    });
    if let Some(c) = single {
        out.push(classifier("single-inversion classifier", c));
    }
    out
}

/// One generated image and its verdict.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    pub case: usize,
    pub method: usize,
    pub correct: bool,
    pub subject_present: bool,
    pub object_present: bool,
    pub unnamed_present: bool,
    /// Denoiser passes spent steering (forward and backward each).
    pub steering_passes: usize,
    pub seconds: f64,
    #[serde(skip)]
    pub rgb: Vec<u8>,
}

/// Generate and score every case with every method. `progress` sees each finished sample.
/// Cases run in parallel; each uses the same initial noise (from its seed) for every method.
pub fn run(
    pipe: &StableDiffusion,
    methods: &[Method],
    cases: &[EvalCase],
    settings: &EvalSettings,
    detector: &Detector,
    progress: impl Fn(&Sample) + Sync,
) -> Result<Vec<Sample>> {
    let uncond = pipe.encode_prompt("")?;
    let side = pipe.default_size();
    let size = side / pipe.vae_scale_factor();
    let channels = pipe.unet.config.in_channels;
    let per_case: Vec<Vec<Sample>> = cases
        .par_iter()
        .enumerate()
        .map(|(ci, case)| -> Result<Vec<Sample>> {
            let prompt = case.prompt();
            let cond = pipe.encode_prompt(&prompt)?;
            let subject_tokens = pipe
                .tokenizer
                .word_token_indices(&prompt, OBJECTS[case.subject].name)?;
            let object_tokens = pipe
                .tokenizer
                .word_token_indices(&prompt, OBJECTS[case.object].name)?;
            let init = Tensor::randn(&[1, channels, size, size], DType::F32, case.seed);
            let mut out = Vec::with_capacity(methods.len());
            for (mi, method) in methods.iter().enumerate() {
                let started = Instant::now();
                let req = GenerateRequest {
                    cond: &cond,
                    uncond: Some(&uncond),
                    guidance: settings.guidance,
                    steps: settings.steps,
                    init_latents: init.clone(),
                    record_maps: None,
                };
                let mut passes = 0;
                let latents = match method.loss {
                    None => pipe.generate(&req, None, |_| {})?.latents,
                    Some(loss) => {
                        let class = method
                            .classes
                            .iter()
                            .position(|c| *c == Some(case.relation))
                            .ok_or_else(|| {
                                Error::Invalid(format!(
                                    "method {}: no class for {:?}",
                                    method.name,
                                    case.relation.name()
                                ))
                            })?;
                        let targets = [SteeringTarget {
                            description: prompt.clone(),
                            subject_tokens: subject_tokens.clone(),
                            object_tokens: object_tokens.clone(),
                            class,
                        }];
                        let steerer = Steerer {
                            unet: &pipe.unet,
                            loss,
                            cond: &cond,
                            targets: &targets,
                            config: &method.config,
                        };
                        let mut hook = |i: usize, t: usize, z: &mut Tensor| {
                            if steerer.applies(i) {
                                passes += steerer.refine(z, i, t)?.passes.len();
                            }
                            Ok(())
                        };
                        pipe.generate(&req, Some(&mut hook), |_| {})?.latents
                    }
                };
                let rgb = to_rgb8(&pipe.decode(&latents)?)?;
                let Verdict {
                    subject,
                    object,
                    correct,
                    unnamed_present,
                } = detector.judge(&rgb, side, side, case.subject, case.relation, case.object)?;
                let sample = Sample {
                    case: ci,
                    method: mi,
                    correct,
                    subject_present: subject.is_some(),
                    object_present: object.is_some(),
                    unnamed_present,
                    steering_passes: passes,
                    seconds: started.elapsed().as_secs_f64(),
                    rgb,
                };
                progress(&sample);
                out.push(sample);
            }
            Ok(out)
        })
        .collect::<Result<_>>()?;
    Ok(per_case.into_iter().flatten().collect())
}

/// One method's scores.
#[derive(Clone, Debug, Serialize)]
pub struct MethodSummary {
    pub method: String,
    pub images: usize,
    /// Both named objects found.
    pub presence: f64,
    /// Some object that the prompt does not name found (the control on smeared colours).
    pub unnamed_present: f64,
    /// GenEval position accuracy (both found and in the requested relation).
    pub accuracy: f64,
    /// Accuracy per relation, in [`Relation::ALL`] order.
    pub accuracy_by_relation: Vec<(String, f64)>,
    pub seconds_per_image: f64,
    pub steering_passes_per_image: f64,
}

pub fn summarize(methods: &[Method], cases: &[EvalCase], samples: &[Sample]) -> Vec<MethodSummary> {
    let frac = |xs: &[&Sample], f: &dyn Fn(&Sample) -> bool| {
        xs.iter().filter(|s| f(s)).count() as f64 / xs.len().max(1) as f64
    };
    methods
        .iter()
        .enumerate()
        .map(|(mi, m)| {
            let mine: Vec<&Sample> = samples.iter().filter(|s| s.method == mi).collect();
            let n = mine.len().max(1) as f64;
            MethodSummary {
                method: m.name.clone(),
                images: mine.len(),
                presence: frac(&mine, &|s| s.subject_present && s.object_present),
                unnamed_present: frac(&mine, &|s| s.unnamed_present),
                accuracy: frac(&mine, &|s| s.correct),
                accuracy_by_relation: Relation::ALL
                    .iter()
                    .map(|&r| {
                        let of: Vec<&Sample> = mine
                            .iter()
                            .copied()
                            .filter(|s| cases[s.case].relation == r)
                            .collect();
                        (r.name().to_string(), frac(&of, &|s| s.correct))
                    })
                    .collect(),
                seconds_per_image: mine.iter().map(|s| s.seconds).sum::<f64>() / n,
                steering_passes_per_image: mine
                    .iter()
                    .map(|s| s.steering_passes as f64)
                    .sum::<f64>()
                    / n,
            }
        })
        .collect()
}

/// The summary as a Markdown table.
pub fn table(summaries: &[MethodSummary]) -> String {
    let mut s = String::from(
        "| method | images | presence | unnamed colour | accuracy | above | below | left of | right of | s/image |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for m in summaries {
        let rel: Vec<String> = m
            .accuracy_by_relation
            .iter()
            .map(|(_, a)| format!("{a:.2}"))
            .collect();
        s += &format!(
            "| {} | {} | {:.2} | {:.2} | **{:.2}** | {} | {:.2} |\n",
            m.method,
            m.images,
            m.presence,
            m.unnamed_present,
            m.accuracy,
            rel.join(" | "),
            m.seconds_per_image
        );
    }
    s
}

/// A contact sheet: one row per case (the first `rows`), one column per method, each image
/// scaled up `zoom` times (nearest), with a grey gap; a (1, 3, H, W) image for `save_png`.
pub fn contact_sheet(
    samples: &[Sample],
    methods: usize,
    rows: usize,
    zoom: usize,
) -> Result<Tensor> {
    let Some(first) = samples.first() else {
        return Err(Error::Invalid("contact sheet of no samples".into()));
    };
    let side = ((first.rgb.len() / 3) as f64).sqrt() as usize;
    let cell = side * zoom + 2;
    let rows = rows.min(samples.iter().map(|s| s.case + 1).max().unwrap_or(0));
    let (h, w) = (rows * cell + 2, methods * cell + 2);
    let mut sheet = vec![160u8; h * w * 3];
    for s in samples.iter().filter(|s| s.case < rows) {
        let (oy, ox) = (s.case * cell + 2, s.method * cell + 2);
        for y in 0..side * zoom {
            for x in 0..side * zoom {
                let src = 3 * ((y / zoom) * side + x / zoom);
                let dst = 3 * ((oy + y) * w + ox + x);
                sheet[dst..dst + 3].copy_from_slice(&s.rgb[src..src + 3]);
            }
        }
    }
    from_rgb8(&sheet, h, w)
}
