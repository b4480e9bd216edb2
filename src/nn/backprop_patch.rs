//! Checks of the one change vlalign makes to candle-core's backward pass
//! (vendor/candle-core/VLALIGN.md): the first gradient reaching a node is stored as it comes
//! (made contiguous from offset 0) instead of being added into a fresh tensor of zeros, a
//! subtracted first gradient is stored negated, and a concatenation's pieces are copied out.
//! Every expected value below is derived by hand.

use crate::nn::host;
use candle_core::{Device, Result, Tensor, Var};

fn values(t: &Tensor) -> Result<Vec<f32>> {
    host::flat::<f32>(t)
}

/// d/dx Σ(x² − x) = 2x − 1: x's first gradient arrives through the subtraction (stored negated,
/// −1), the second through the square (added onto it).
#[test]
fn subtracted_first_gradient_is_negated_then_summed() -> Result<()> {
    let x = Var::new(&[1f32, 2., 3.], &Device::Cpu)?;
    let loss = (x.sqr()? - x.as_tensor())?.sum_all()?;
    let g = loss.backward()?;
    assert_eq!(values(g.get(&x).expect("x has a gradient"))?, [1., 3., 5.]);
    // The other order: Σ(x − x²) = 1 − 2x, x first reached through the plain side.
    let loss = (x.as_tensor() - x.sqr()?)?.sum_all()?;
    let g = loss.backward()?;
    assert_eq!(
        values(g.get(&x).expect("x has a gradient"))?,
        [-1., -3., -5.]
    );
    Ok(())
}

/// Σ(cat([y, x], 0) ⊙ c): y's gradient is the first two rows of c, x's the last two (each piece
/// copied out of the concatenation's gradient); x used twice more as cat([x, 3x], 0) sums c's
/// rows 0–1 and three times rows 2–3.
#[test]
fn pieces_of_a_concatenation_get_their_rows() -> Result<()> {
    let dev = Device::Cpu;
    let x = Var::new(&[[1f32, 2.], [3., 4.]], &dev)?;
    let y = Var::new(&[[5f32, 6.], [7., 8.]], &dev)?;
    let c = Tensor::new(&[[1f32, 2.], [3., 4.], [5., 6.], [7., 8.]], &dev)?;
    let loss = Tensor::cat(&[y.as_tensor(), x.as_tensor()], 0)?
        .mul(&c)?
        .sum_all()?;
    let g = loss.backward()?;
    let (gx, gy) = (g.get(&x).expect("x"), g.get(&y).expect("y"));
    assert_eq!(values(gy)?, [1., 2., 3., 4.]);
    assert_eq!(values(gx)?, [5., 6., 7., 8.]);
    assert!(gx.is_contiguous() && gy.is_contiguous());
    assert_eq!((gx.dims(), gy.dims()), (&[2, 2][..], &[2, 2][..]));

    let loss = Tensor::cat(&[x.as_tensor(), &(x.as_tensor() * 3.)?], 0)?
        .mul(&c)?
        .sum_all()?;
    let g = loss.backward()?;
    // [1,2,3,4] + 3·[5,6,7,8]
    assert_eq!(values(g.get(&x).expect("x"))?, [16., 20., 24., 28.]);
    Ok(())
}

/// Σ(xᵀ ⊙ c) for x of 2×3: the gradient arrives transposed (not contiguous) and is stored as
/// cᵀ laid out contiguously.
#[test]
fn a_strided_first_gradient_is_made_contiguous() -> Result<()> {
    let dev = Device::Cpu;
    let x = Var::new(&[[0f32; 3]; 2], &dev)?;
    let c = Tensor::new(&[[1f32, 2.], [3., 4.], [5., 6.]], &dev)?;
    let loss = x.t()?.mul(&c)?.sum_all()?;
    let g = loss.backward()?;
    let gx = g.get(&x).expect("x has a gradient");
    assert!(gx.is_contiguous());
    assert_eq!(gx.dims(), &[2, 3]);
    assert_eq!(values(gx)?, [1., 3., 5., 2., 4., 6.]);
    Ok(())
}
