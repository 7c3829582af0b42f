//! Checkpoints: save, load into a fresh model, the same outputs; the preprocessing travels
//! with the weights; a checkpoint of another model is refused with the tensor's name.

mod common;

use common::randn;
use regimen::data::{PreprocessKind, Preprocessor};
use regimen::layer::{Ctx, Layer};
use regimen::{checkpoint, models, Rng};

#[test]
fn save_then_load_reproduces_the_model_and_its_preprocessing() {
    let dir = std::env::temp_dir().join(format!("regimen-ckpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.safetensors");
    let mut a = models::for_input("digits-cnn", [1, 8, 8], 10, &mut Rng::new(1)).unwrap();
    // Train-mode forwards move the batch-norm running statistics away from their defaults.
    for s in 0..3 {
        a.forward(&randn(&[16, 1, 8, 8], s), &Ctx::train()).unwrap();
    }
    let data = regimen::data::digits().unwrap();
    let pre = Preprocessor::fit(PreprocessKind::PerChannel, &data).unwrap();
    checkpoint::save(&path, &mut a, Some(&pre), Default::default()).unwrap();

    let mut b = models::for_input("digits-cnn", [1, 8, 8], 10, &mut Rng::new(99)).unwrap();
    let loaded = checkpoint::load(&path, &mut b).unwrap();
    assert_eq!(loaded.preprocess.as_ref(), Some(&pre));
    let x = randn(&[4, 1, 8, 8], 7);
    assert_eq!(
        a.forward(&x, &Ctx::eval()).unwrap().to_vec(),
        b.forward(&x, &Ctx::eval()).unwrap().to_vec()
    );

    let mut other = models::for_input("digits-mlp", [1, 8, 8], 10, &mut Rng::new(1)).unwrap();
    let err = checkpoint::load(&path, &mut other)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("model.safetensors")
            && err.contains("1.weight has shape [16], the model expects [128, 64]"),
        "{err}"
    );
    let mut wider = models::for_input("digits-cnn", [1, 8, 8], 12, &mut Rng::new(1)).unwrap();
    let err = checkpoint::load(&path, &mut wider)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("has shape [10, 32], the model expects [12, 32]"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
