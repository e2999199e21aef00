//! A reduced `steer eval` on the shipped ShapesWorld model and classifier: on fixed prompts and
//! seeds, steering with the learned classifier raises GenEval position accuracy over the
//! unsteered images made from the same noise.

use steer::pipelines::StableDiffusion;
use steer::shapes::detect::Detector;
use steer::shapes::eval::{self, EvalSettings};
use steer::shapes::model::{shipped_file, shipped_model_dir};
use steer::steering::centroid::CentroidLoss;
use steer::steering::classifier::RelationClassifier;
use steer::steering::prompt::Relation;

#[test]
fn learned_steering_raises_position_accuracy() {
    let pipe = StableDiffusion::from_dir(shipped_model_dir().unwrap()).unwrap();
    let classifier =
        RelationClassifier::load(shipped_file("classifier.safetensors").expect("shipped")).unwrap();
    let settings = EvalSettings::default();
    let centroid = CentroidLoss::new(Relation::ALL.to_vec());
    let mut methods = eval::methods(&settings, Some(&classifier), &centroid, None);
    methods.retain(|m| m.name != "hand-crafted (centroid)");
    // The full eval's first 12 cases: three object pairs in all four relations, seed 0.
    let mut cases = eval::cases(1);
    cases.truncate(12);
    let samples = eval::run(
        &pipe,
        &methods,
        &cases,
        &settings,
        &Detector::default(),
        |_| {},
    )
    .unwrap();
    let summary = eval::summarize(&methods, &cases, &samples);
    eprintln!("{}", eval::table(&summary));
    let (unsteered, learned) = (&summary[0], &summary[1]);
    // Random placement is right about a quarter of the time; the shipped classifier, measured
    // by the full eval, is right far more often. A margin of 0.25 (3 of 12 images) leaves room
    // for the noise of a small sample while still failing if steering did nothing.
    assert!(
        learned.accuracy >= unsteered.accuracy + 0.25,
        "unsteered {:.2}, steered {:.2}",
        unsteered.accuracy,
        learned.accuracy
    );
}
