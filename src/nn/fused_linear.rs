//! `y = x Wᵀ + b` as one CPU op forward and one backward. Composed from candle ops the layer is
//! five graph nodes (flatten, transpose, matmul, bias, unflatten), and candle's backward gives
//! every node's input a fresh zero tensor to add its gradient into (backprop.rs `or_insert`): four
//! extra activation-sized passes per layer. Here the bias rides in the product (the output starts
//! as the bias rows and the gemm adds to it), the input keeps its leading dimensions, and the
//! backward forms only the gradients that something needs: `dx = dy W` when `x` is on a gradient
//! path, `dW = dyᵀ x` when `W` is (a frozen weight gets none: BLIP-2 stage 2's frozen LM), and
//! `db`, a column sum in a fixed order. The weight is either row-major `[n, k]` or stored
//! transposed (a frozen weight on the CPU, see `nn::linear`): each product reads it through the
//! strides of its layout.

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::fused::{column_sum, f32s, with_f32s};
use super::gemm::{product, written};
use candle_core::Storage;

/// Sizes: `rows` of `k` inputs to `n` outputs.
#[derive(Clone, Copy)]
pub(super) struct Dims {
    pub(super) rows: usize,
    pub(super) k: usize,
    pub(super) n: usize,
}

fn dims(x: &Layout, w: &Layout) -> Result<(Dims, Shape)> {
    let (n, k) = w.shape().dims2()?;
    let xd = x.dims();
    if xd.last() != Some(&k) {
        bail!("linear: input {xd:?} for a weight [{n}, {k}]");
    }
    let mut out = xd.to_vec();
    *out.last_mut().expect("non-empty") = n;
    let rows = x.shape().elem_count() / k.max(1);
    Ok((Dims { rows, k, n }, Shape::from(out)))
}

/// A weight `[n, k]` as it lies in memory.
#[derive(Clone, Copy)]
enum Weight<'a> {
    /// Row-major `[n, k]`, as checkpoints store it.
    Rows(&'a [f32]),
    /// Stored transposed, row-major `[k, n]` (a frozen weight on the CPU: `nn::linear`).
    Cols(&'a [f32]),
}

impl<'a> Weight<'a> {
    /// The weight's elements in the layout `l` gives them (one of the two above).
    fn of(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<Self> {
        if l.contiguous_offsets().is_some() {
            return Ok(Weight::Rows(f32s(s, l, what)?));
        }
        match transposed(l) {
            true => Ok(Weight::Cols(f32s(s, &l.transpose(0, 1)?, what)?)),
            false => bail!("{what}: a weight must be contiguous or a contiguous transpose"),
        }
    }

    /// `W` (`[n, k]`) as a product's right operand: the slice and its (row, column) strides.
    fn as_w(self, d: Dims) -> (&'a [f32], (usize, usize)) {
        match self {
            Weight::Rows(w) => (w, (d.k, 1)),
            Weight::Cols(w) => (w, (1, d.n)),
        }
    }

    /// `Wᵀ` (`[k, n]`) as a product's right operand.
    fn as_wt(self, d: Dims) -> (&'a [f32], (usize, usize)) {
        match self {
            Weight::Rows(w) => (w, (1, d.k)),
            Weight::Cols(w) => (w, (d.n, 1)),
        }
    }
}

/// Whether a layout is 2-D, not contiguous, and the transpose of a contiguous one: a weight
/// stored transposed.
pub(crate) fn transposed(l: &Layout) -> bool {
    l.dims().len() == 2
        && l.contiguous_offsets().is_none()
        && l.transpose(0, 1)
            .is_ok_and(|t| t.contiguous_offsets().is_some())
}

/// The threads of the rayon pool this runs in (the global pool, or a Q-Former shard's).
fn threads() -> usize {
    rayon::current_num_threads()
}

/// `dst [m, n] (+)= lhs · rhs` with `dst` row-major, starting as `init` (accumulated into) or
/// written whole; the operands as pointers with (row, column) strides.
pub(super) fn product_into(
    (m, n, k): (usize, usize, usize),
    init: Option<Vec<f32>>,
    (lhs, lhs_s): (&[f32], (usize, usize)),
    (rhs, rhs_s): (&[f32], (usize, usize)),
) -> Vec<f32> {
    match init {
        Some(mut dst) => {
            product_to((m, n, k), &mut dst, true, (lhs, lhs_s), (rhs, rhs_s));
            dst
        }
        // SAFETY: without `accumulate` the product writes all m·n elements, reading none.
        None => unsafe {
            written(m * n, |dst| {
                product_raw((m, n, k), (dst, m * n), false, (lhs, lhs_s), (rhs, rhs_s))
            })
        },
    }
}

/// `dst [m, n] (+)= lhs · rhs` into a row-major slice (added to it with `accumulate`).
///
/// # Panics
/// If the strides reach outside an operand (a caller's bug; checked before any write).
pub(super) fn product_to(
    mnk: (usize, usize, usize),
    dst: &mut [f32],
    accumulate: bool,
    lhs: (&[f32], (usize, usize)),
    rhs: (&[f32], (usize, usize)),
) {
    // SAFETY: `dst` is a borrowed slice of its length, initialised.
    unsafe { product_raw(mnk, (dst.as_mut_ptr(), dst.len()), accumulate, lhs, rhs) }
}

/// [`product_to`] into `len` floats at `dst`, which need not be initialised when not
/// `accumulate` (the product writes them all, reading none).
///
/// # Safety
/// `dst` must be valid for `len` writes (and reads, with `accumulate`), aliasing nothing else.
unsafe fn product_raw(
    (m, n, k): (usize, usize, usize),
    (dst, len): (*mut f32, usize),
    accumulate: bool,
    (lhs, lhs_s): (&[f32], (usize, usize)),
    (rhs, rhs_s): (&[f32], (usize, usize)),
) {
    let reach = |(r, c): (usize, usize), (rs, cs): (usize, usize)| match r * c {
        0 => 0,
        _ => (r - 1) * rs + (c - 1) * cs + 1,
    };
    assert!(
        len >= m * n && lhs.len() >= reach((m, k), lhs_s) && rhs.len() >= reach((k, n), rhs_s),
        "product operands shorter than their strides reach"
    );
    // SAFETY: checked above: the strides address `lhs` as [m, k] and `rhs` as [k, n] inside
    // them and `dst` holds m·n elements; the caller guarantees nothing aliases it.
    unsafe {
        product(
            (m, n, k),
            dst,
            (n, 1),
            lhs.as_ptr(),
            lhs_s,
            rhs.as_ptr(),
            rhs_s,
            accumulate,
            threads(),
        )
    }
}

/// `x Wᵀ (+ b)`: x `[rows, k]`, w `[n, k]` read as Wᵀ through its strides; the bias rows are the
/// product's starting value.
pub(super) fn forward(d: Dims, x: &[f32], w: &[f32], b: Option<&[f32]>) -> Vec<f32> {
    forward_laid(d, x, Weight::Rows(w), b)
}

/// [`forward`] for a weight in either layout.
fn forward_laid(d: Dims, x: &[f32], w: Weight, b: Option<&[f32]>) -> Vec<f32> {
    // A few rows (decode steps of an LM): the few-rows kernels; against W stored transposed,
    // from five rows on, the gemm crate, which then reads Wᵀ's rows as they lie.
    match w {
        Weight::Rows(w) if (1..=super::few_rows::MAX_ROWS).contains(&d.rows) => {
            return super::few_rows::product(d.rows, d.k, x, w, b);
        }
        Weight::Cols(wt) if (1..=super::few_rows::COLS_MAX_ROWS).contains(&d.rows) => {
            return super::few_rows::product_cols(d.rows, d.k, x, wt, b);
        }
        _ => {}
    }
    let init = b.map(|b| b.repeat(d.rows));
    product_into((d.rows, d.n, d.k), init, (x, (d.k, 1)), w.as_wt(d))
}

/// `dy W` (`[rows, k]`).
pub(super) fn input_grad(d: Dims, dy: &[f32], w: &[f32]) -> Vec<f32> {
    input_grad_laid(d, dy, Weight::Rows(w))
}

/// [`input_grad`] for a weight in either layout.
fn input_grad_laid(d: Dims, dy: &[f32], w: Weight) -> Vec<f32> {
    product_into((d.rows, d.k, d.n), None, (dy, (d.n, 1)), w.as_w(d))
}

/// `dyᵀ x` (`[n, k]`), dy read transposed through its strides.
fn weight_grad(d: Dims, dy: &[f32], x: &[f32]) -> Vec<f32> {
    product_into((d.n, d.k, d.rows), None, (dy, (1, d.n)), (x, (d.k, 1)))
}

/// `dyᵀ x` written into `dst` (`[n, k]`).
pub(super) fn weight_grad_to(d: Dims, dy: &[f32], x: &[f32], dst: &mut [f32]) {
    product_to(
        (d.n, d.k, d.rows),
        dst,
        false,
        (dy, (1, d.n)),
        (x, (d.k, 1)),
    )
}

/// The gradients of `x` and `w` (each only when it is on a gradient path) and of the bias
/// (when `bias` is given).
fn backward(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    dy: &Tensor,
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let dy = dy.contiguous()?;
    let (d, _) = dims(x.layout(), w.layout())?;
    let dev = x.device();
    with_f32s([&dy], "linear backward: output gradient", |[g]| {
        let dx = match x.track_op() {
            true => {
                let (s, l) = w.storage_and_layout();
                let Storage::Cpu(s) = &*s else {
                    bail!("linear backward: the weight is not on the CPU");
                };
                let wv = Weight::of(s, l, "linear backward: weight")?;
                Some(Tensor::from_vec(input_grad_laid(d, g, wv), x.shape(), dev)?)
            }
            false => None,
        };
        let dw = match w.track_op() {
            true => Some(with_f32s([x], "linear backward: input", |[xv]| {
                Tensor::from_vec(weight_grad(d, g, xv), w.shape(), dev)
            })?),
            false => None,
        };
        let db = match bias {
            Some(b) if b.track_op() => Some(Tensor::from_vec(column_sum(g, d.n), d.n, dev)?),
            _ => None,
        };
        Ok((dx, dw, db))
    })
}

struct LinearBias;

impl CustomOp3 for LinearBias {
    fn name(&self) -> &'static str {
        "vlalign-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (d, shape) = dims(l1, l2)?;
        let b = f32s(s3, l3, "linear bias")?;
        if b.len() != d.n {
            bail!("linear: bias of {} for {} outputs", b.len(), d.n);
        }
        let (x, w) = (
            f32s(s1, l1, "linear input")?,
            Weight::of(s2, l2, "linear weight")?,
        );
        Ok((CpuStorage::F32(forward_laid(d, x, w, Some(b))), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        backward(x, w, Some(b), dy)
    }
}

struct LinearNoBias;

impl CustomOp2 for LinearNoBias {
    fn name(&self) -> &'static str {
        "vlalign-linear-no-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (d, shape) = dims(l1, l2)?;
        let (x, w) = (
            f32s(s1, l1, "linear input")?,
            Weight::of(s2, l2, "linear weight")?,
        );
        Ok((CpuStorage::F32(forward_laid(d, x, w, None)), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = backward(x, w, None, dy)?;
        Ok((dx, dw))
    }
}

/// Whether [`linear`] runs for these tensors: float32, all on the CPU.
pub fn supported(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> bool {
    let cpu_f32 = |t: &Tensor| t.dtype() == candle_core::DType::F32 && t.device().is_cpu();
    cpu_f32(x) && cpu_f32(w) && b.is_none_or(cpu_f32)
}

/// `x Wᵀ + b` for `x` `[.., in]`, `w` `[out, in]`, `b` `[out]`: `[.., out]`. A weight stored
/// transposed is read as it lies.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let x = x.contiguous()?;
    let w = match transposed(w.layout()) {
        true => w.clone(),
        false => w.contiguous()?,
    };
    match b {
        Some(b) => x.apply_op3(&w, &b.contiguous()?, LinearBias),
        None => x.apply_op2(&w, LinearNoBias),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn rel(a: &Tensor, c: &Tensor) -> f32 {
        crate::nn::fused::rel(a, c).unwrap()
    }

    /// Against candle's composition (`x.matmul(wᵀ) + b` over the flattened rows): values and
    /// every gradient, with and without a bias, on a 3-D input.
    #[test]
    fn fused_linear_matches_the_composition() {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1.0, (3, 70, 24), &dev).unwrap();
        let w = Var::randn(0f32, 0.3, (40, 24), &dev).unwrap();
        let b = Var::randn(0f32, 0.3, 40, &dev).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (3, 70, 40), &dev).unwrap();
        for bias in [Some(&b), None] {
            let bt = bias.map(|v| v.as_tensor());
            let ours = linear(x.as_tensor(), w.as_tensor(), bt).unwrap();
            let flat = x.as_tensor().reshape((210, 24)).unwrap();
            let mut theirs = flat.matmul(&w.as_tensor().t().unwrap()).unwrap();
            if let Some(b) = bt {
                theirs = theirs.broadcast_add(b).unwrap();
            }
            let theirs = theirs.reshape((3, 70, 40)).unwrap();
            assert!(rel(&ours, &theirs) < 1e-6, "values {}", rel(&ours, &theirs));
            let g = |y: Tensor| {
                y.mul(&probe)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap()
            };
            let (go, gt) = (g(ours), g(theirs));
            let mut vars = vec![&x, &w];
            vars.extend(bias);
            for v in vars {
                let (a, c) = (
                    go.get(v.as_tensor()).unwrap(),
                    gt.get(v.as_tensor()).unwrap(),
                );
                assert!(rel(a, c) < 1e-5, "gradient {}", rel(a, c));
            }
        }
    }

    /// A frozen weight (a plain tensor) gets no gradient formed; the input's is still right.
    #[test]
    fn a_frozen_weight_gets_no_gradient() {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1.0, (5, 12), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (7, 12), &dev).unwrap();
        let g = linear(x.as_tensor(), &w, None)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(g.get(&w).is_none());
        let expect = Tensor::ones((5, 7), candle_core::DType::F32, &dev)
            .unwrap()
            .matmul(&w)
            .unwrap();
        assert!(rel(g.get(x.as_tensor()).unwrap(), &expect) < 1e-6);
    }

    /// A weight stored transposed (`nn::linear`'s frozen layout) gives the composition's values
    /// and input gradient, for few rows (a decode step) and many, with and without a bias.
    #[test]
    fn a_weight_stored_transposed_reads_as_the_composition() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 0.3, (40, 24), &dev).unwrap();
        let b = Tensor::randn(0f32, 0.3, 40, &dev).unwrap();
        let cols = w.t().unwrap().contiguous().unwrap().t().unwrap();
        assert!(!cols.is_contiguous() && transposed(cols.layout()));
        for rows in [1, 5, 8, 9, 70] {
            let x = Var::randn(0f32, 1.0, (rows, 24), &dev).unwrap();
            let probe = Tensor::randn(0f32, 1.0, (rows, 40), &dev).unwrap();
            for bias in [Some(&b), None] {
                let ours = linear(x.as_tensor(), &cols, bias).unwrap();
                let mut theirs = x.as_tensor().matmul(&w.t().unwrap()).unwrap();
                if let Some(b) = bias {
                    theirs = theirs.broadcast_add(b).unwrap();
                }
                assert!(
                    rel(&ours, &theirs) < 1e-6,
                    "rows {rows}: {}",
                    rel(&ours, &theirs)
                );
                let g = ours
                    .mul(&probe)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                assert!(g.get(&cols).is_none());
                let expect = probe.matmul(&w).unwrap();
                let got = g.get(x.as_tensor()).unwrap();
                assert!(
                    rel(got, &expect) < 1e-5,
                    "rows {rows} dx: {}",
                    rel(got, &expect)
                );
            }
        }
    }
}
