//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::HashMap;

use regimen::{Device, Rng, Tensor};

/// A fixture written by `tools/golden.py`: named f32 tensors and string metadata.
pub struct Fixture {
    pub name: String,
    pub tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
    pub meta: HashMap<String, String>,
}

impl Fixture {
    pub fn load(name: &str) -> Fixture {
        let path = format!(
            "{}/tests/fixtures/{name}.safetensors",
            env!("CARGO_MANIFEST_DIR")
        );
        let bytes =
            std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e} (run tools/golden.py)"));
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let meta = header.metadata().clone().unwrap_or_default();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut tensors = HashMap::new();
        for (k, v) in st.tensors() {
            assert_eq!(v.dtype(), safetensors::Dtype::F32, "{name}: {k}");
            let data = v
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            tensors.insert(k.to_string(), (v.shape().to_vec(), data));
        }
        Fixture {
            name: name.to_string(),
            tensors,
            meta,
        }
    }

    pub fn tensor(&self, key: &str) -> Tensor {
        let (shape, data) = self
            .tensors
            .get(key)
            .unwrap_or_else(|| panic!("{}: no tensor {key}", self.name));
        Tensor::from_host(shape, data.clone(), Device::Cpu).unwrap()
    }

    pub fn has(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }

    pub fn keys_with_prefix(&self, prefix: &str) -> Vec<String> {
        let mut k: Vec<String> = self
            .tensors
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect();
        k.sort();
        k
    }
}

/// Assert `got` equals `want` element-wise within `atol + rtol |want|`, printing the largest
/// difference either way.
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, atol: f32, rtol: f32) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    let (g, w) = (got.to_vec(), want.to_vec());
    let mut worst = (0usize, 0.0f32);
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let d = (a - b).abs();
        if d > worst.1 {
            worst = (i, d);
        }
        assert!(
            d <= atol + rtol * b.abs(),
            "{what}[{i}]: got {a}, want {b} (|diff| {d})"
        );
    }
    eprintln!("{what}: max |diff| {:.2e} at [{}]", worst.1, worst.0);
}

/// Distinct values spaced 4/n apart in (-2, 2), none within 2/n of zero, shuffled: no ties in a
/// max and no input at a ReLU kink, for finite differences with a step below 2/n.
pub fn spaced(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut v: Vec<f32> = (0..n)
        .map(|i| ((i as f64 - n as f64 / 2.0 + 0.5) * (4.0 / n as f64)) as f32)
        .collect();
    Rng::new(seed).shuffle(&mut v);
    Tensor::from_host(shape, v, Device::Cpu).unwrap()
}

/// Gaussian values.
pub fn randn(shape: &[usize], seed: u64) -> Tensor {
    let mut r = Rng::new(seed);
    let v = (0..shape.iter().product())
        .map(|_| r.normal() as f32)
        .collect();
    Tensor::from_host(shape, v, Device::Cpu).unwrap()
}
