//! The layers. Each file holds one concept with its formula in the doc comment.

mod activation;
mod batch_norm;
mod conv2d;
mod dropout;
mod flatten;
mod fractional_max_pool;
mod linear;
mod maxout;
mod pool;
mod residual;
mod sequential;

pub use activation::{parse_activation, Activation, PReLU, Softmax, Swish};
pub use batch_norm::BatchNorm;
pub use conv2d::Conv2d;
pub use dropout::Dropout;
pub use flatten::Flatten;
pub use fractional_max_pool::FractionalMaxPool2d;
pub use linear::Linear;
pub use maxout::Maxout;
pub use pool::{AvgPool2d, GlobalAvgPool, MaxPool2d};
pub use residual::Residual;
pub use sequential::{Sequential, Summary, SummaryRow};

use crate::backend::Unary;

pub fn relu() -> Activation {
    Activation::new(Unary::Relu)
}
pub fn sigmoid() -> Activation {
    Activation::new(Unary::Sigmoid)
}
pub fn tanh() -> Activation {
    Activation::new(Unary::Tanh)
}
pub fn leaky_relu(slope: f32) -> Activation {
    Activation::new(Unary::LeakyRelu(slope))
}
pub fn elu(alpha: f32) -> Activation {
    Activation::new(Unary::Elu(alpha))
}
pub fn selu() -> Activation {
    Activation::new(Unary::Selu)
}
pub fn softplus() -> Activation {
    Activation::new(Unary::Softplus {
        beta: 1.0,
        threshold: 20.0,
    })
}
pub fn gelu() -> Activation {
    Activation::new(Unary::Gelu)
}
pub fn mish() -> Activation {
    Activation::new(Unary::Mish)
}
/// Swish with a fixed beta (`swish(1.0)` is SiLU). For a learned beta see [`Swish::learned`].
pub fn swish(beta: f32) -> Activation {
    Activation::new(Unary::Swish(beta))
}
