//! Losses and penalties. Each returns its value as a one-element tensor on the device and the
//! gradient of that value with respect to its input.

mod cross_entropy;
mod mse;
mod penalty;

pub use cross_entropy::{CrossEntropy, LossOutput};
pub use mse::Mse;
pub use penalty::{parse_penalty, Penalty};
