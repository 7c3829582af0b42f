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

/// A file regimen wrote carries a CRC-32C of its tensor data: a changed byte is refused with
/// the file's name; a safetensors file from elsewhere (no checksum) still loads.
#[test]
fn damaged_tensor_data_is_refused() {
    use regimen::io::{read_safetensors, write_safetensors, CHECKSUM_KEY};
    let dir = std::env::temp_dir().join(format!("regimen-crc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("t.safetensors");
    let tensors = vec![
        ("a".to_string(), vec![2usize, 3], randn(&[2, 3], 1).to_vec()),
        ("b".to_string(), vec![4usize], randn(&[4], 2).to_vec()),
    ];
    let meta: std::collections::BTreeMap<String, String> =
        [("k".to_string(), "v".to_string())].into();
    write_safetensors(&path, &tensors, meta.clone()).unwrap();
    let (back, back_meta) = read_safetensors(&path).unwrap();
    assert_eq!(back, tensors);
    assert_eq!(
        back_meta, meta,
        "the checksum is not part of the metadata read back"
    );
    // One bit of the last tensor's last value.
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    let err = read_safetensors(&path).unwrap_err().to_string();
    assert!(
        err.contains("t.safetensors") && err.contains("the tensor data is damaged"),
        "{err}"
    );
    // The same file without the checksum (as another tool writes it) loads, byte flip and all.
    let views: Vec<(String, safetensors::tensor::TensorView)> = back
        .iter()
        .map(|(n, s, v)| {
            let data: &[u8] = bytemuck_f32(v);
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), data)
                    .unwrap(),
            )
        })
        .collect();
    let plain = safetensors::serialize(views, None).unwrap();
    assert!(!String::from_utf8_lossy(&plain).contains(CHECKSUM_KEY));
    std::fs::write(&path, &plain).unwrap();
    assert_eq!(read_safetensors(&path).unwrap().0, tensors);
    let _ = std::fs::remove_dir_all(&dir);
}

fn bytemuck_f32(v: &[f32]) -> &[u8] {
    // f32 has no padding and any byte pattern is a valid u8.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}
