//! Multi-head scaled dot-product attention as one CPU kernel forward and one backward, the
//! arithmetic of transformers' `eager_attention_forward` (softmax(q kᵀ · d^-½ + mask) v) without
//! its intermediates: heads are read and written in place through strides (no split/merge
//! copies), and each (batch, head) pair's scores live in a per-thread `[Tq, Tk]` scratch, never in
//! a `[B, H, Tq, Tk]` tensor, forward or backward. The backward recomputes the probabilities from
//! q and k (one product more, as PyTorch's fused CPU attention does) instead of keeping them.
//!
//! The composed path (attention.rs) computes the same thing op by op and is what other devices
//! run; `fused_attention_matches_the_composition` holds the two together.

use std::sync::Arc;

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::fused::{f32s, softmax_bwd_rows, softmax_rows, with_f32s};
use super::gemm::{product, written};

/// Sizes of one call and where q, k and v sit: q rows `[b, tq]`, k and v rows `[b, tk]`, each
/// row holding `h` heads of `d` from column `cols[i]` on, rows `q_row` / `kv_row` apart (q, k, v
/// apart: `h·d`, columns 0; one packed `[b, t, 3·h·d]` projection: `3·h·d`, columns 0, h·d,
/// 2·h·d). The output and its gradient are `[b, tq, h·d]`; the input gradients are laid out as
/// the inputs.
#[derive(Clone, Copy, Debug)]
struct Dims {
    b: usize,
    tq: usize,
    tk: usize,
    h: usize,
    d: usize,
    q_row: usize,
    kv_row: usize,
    cols: [usize; 3],
}

impl Dims {
    /// Row stride of the output and its gradient (all heads of a token are one row).
    fn width(&self) -> usize {
        self.h * self.d
    }

    /// Offset of head `h` of batch `b`'s first query / key / value / output row.
    fn q_at(&self, b: usize, h: usize) -> usize {
        b * self.tq * self.q_row + self.cols[0] + h * self.d
    }

    fn k_at(&self, b: usize, h: usize) -> usize {
        b * self.tk * self.kv_row + self.cols[1] + h * self.d
    }

    fn v_at(&self, b: usize, h: usize) -> usize {
        b * self.tk * self.kv_row + self.cols[2] + h * self.d
    }

    fn y_at(&self, b: usize, h: usize) -> usize {
        b * self.tq * self.width() + h * self.d
    }
}

/// An additive mask broadcast to `[b, h, tq, tk]`: its values and the stride of each of those
/// dimensions in them (0 where the mask has size 1).
struct Mask {
    values: Vec<f32>,
    strides: [usize; 4],
}

impl Mask {
    fn new(mask: &Tensor, dims: Dims) -> Result<Self> {
        let want = [dims.b, dims.h, dims.tq, dims.tk];
        let shape = mask.dims();
        if shape.len() != 4 || shape.iter().zip(want).any(|(&m, w)| m != 1 && m != w) {
            bail!("attention mask {shape:?} does not broadcast to {want:?}");
        }
        let values = mask
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut strides = [0; 4];
        let mut step = 1;
        for i in (0..4).rev() {
            strides[i] = if shape[i] == 1 { 0 } else { step };
            step *= shape[i];
        }
        Ok(Self { values, strides })
    }

    /// Row `i` of the mask of batch `b`, head `h` (length tk, stride `strides[3]`).
    fn add_row(&self, b: usize, h: usize, i: usize, row: &mut [f32]) {
        let s = self.strides;
        let at = b * s[0] + h * s[1] + i * s[2];
        for (j, v) in row.iter_mut().enumerate() {
            *v += self.values[at + j * s[3]];
        }
    }
}

/// A raw pointer the (batch, head) tasks write through: each writes a disjoint set of elements.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: the tasks sharing it write disjoint elements (see each use).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// The pointer `offset` elements on (a method, so that closures capture the whole `Out`).
    ///
    /// # Safety
    /// `offset` must stay inside the buffer.
    unsafe fn at(self, offset: usize) -> *mut f32 {
        self.0.add(offset)
    }
}

/// The attention probabilities of batch `b`, head `h` into `p` (`[tq, tk]`, row-major):
/// softmax over keys of q·kᵀ · scale + mask, each row as `fused::softmax_last` computes it.
#[allow(clippy::too_many_arguments)]
fn probabilities(
    dm: Dims,
    q: &[f32],
    k: &[f32],
    b: usize,
    h: usize,
    scale: f32,
    mask: Option<&Mask>,
    p: &mut [f32],
) {
    // SAFETY: q and k hold the rows `dm` describes; the strides stay inside head h of batch b;
    // p is tq×tk.
    unsafe {
        product(
            (dm.tq, dm.tk, dm.d),
            p.as_mut_ptr(),
            (dm.tk, 1),
            q.as_ptr().add(dm.q_at(b, h)),
            (dm.q_row, 1),
            k.as_ptr().add(dm.k_at(b, h)),
            (1, dm.kv_row),
            false,
            1,
        );
    }
    for (i, r) in p.chunks_mut(dm.tk).enumerate() {
        r.iter_mut().for_each(|v| *v *= scale);
        if let Some(m) = mask {
            m.add_row(b, h, i, r);
        }
    }
    softmax_rows(p, dm.tk);
}

/// The parameters both ops share.
#[derive(Clone)]
struct Heads {
    heads: usize,
    scale: f32,
    mask: Option<Arc<Mask>>,
}

impl Heads {
    /// For a call of sizes `dm`, with the additive `mask`.
    fn new(dm: Dims, mask: Option<&Tensor>) -> Result<Self> {
        let mask = match mask {
            Some(m) => Some(Arc::new(Mask::new(m, dm)?)),
            None => None,
        };
        Ok(Self {
            heads: dm.h,
            scale: (dm.d as f64).powf(-0.5) as f32,
            mask,
        })
    }

    /// `y = softmax(q kᵀ · scale + mask) v`, `[b, tq, h·d]`; q, k, v are read where `dm` says
    /// (the same slice when packed).
    fn forward(&self, dm: Dims, q: &[f32], k: &[f32], v: &[f32]) -> Vec<f32> {
        let len = dm.b * dm.tq * dm.width();
        let mask = self.mask.as_deref();
        let fill = |y: *mut f32| {
            let y_p = Out(y);
            (0..dm.b * dm.h).into_par_iter().for_each_init(
                || vec![0f32; dm.tq * dm.tk],
                |p, bh| {
                    let (b, h) = (bh / dm.h, bh % dm.h);
                    probabilities(dm, q, k, b, h, self.scale, mask, p);
                    // SAFETY: task (b, h) alone writes head h of batch b of y; y = p · v.
                    unsafe {
                        product(
                            (dm.tq, dm.d, dm.tk),
                            y_p.at(dm.y_at(b, h)),
                            (dm.width(), 1),
                            p.as_ptr(),
                            (dm.tk, 1),
                            v.as_ptr().add(dm.v_at(b, h)),
                            (dm.kv_row, 1),
                            false,
                            1,
                        );
                    }
                },
            );
        };
        // SAFETY: the tasks write every element of y (all heads of all rows), reading none.
        unsafe { written(len, fill) }
    }

    /// dq, dk, dv of the output gradient `dy` (`[b, tq, h·d]`) written through `out` (laid out
    /// as q, k, v: three buffers, or one when packed). Every (batch, head) task writes its head
    /// of each and nothing else, reading nothing there.
    fn backward(&self, dm: Dims, (q, k, v): (&[f32], &[f32], &[f32]), dy: &[f32], out: [Out; 3]) {
        let [dq_p, dk_p, dv_p] = out;
        let width = dm.width();
        let mask = self.mask.as_deref();
        (0..dm.b * dm.h).into_par_iter().for_each_init(
            || (vec![0f32; dm.tq * dm.tk], vec![0f32; dm.tq * dm.tk]),
            |(p, dp), bh| {
                let (b, h) = (bh / dm.h, bh % dm.h);
                probabilities(dm, q, k, b, h, self.scale, mask, p);
                let (qa, ka, va, ya) = (dm.q_at(b, h), dm.k_at(b, h), dm.v_at(b, h), dm.y_at(b, h));
                // SAFETY: task (b, h) alone writes head h of batch b of dq, dk, dv; every
                // operand is addressed inside its buffer by the strides.
                unsafe {
                    // dv = pᵀ · dy
                    product(
                        (dm.tk, dm.d, dm.tq),
                        dv_p.at(va),
                        (dm.kv_row, 1),
                        p.as_ptr(),
                        (1, dm.tk),
                        dy.as_ptr().add(ya),
                        (width, 1),
                        false,
                        1,
                    );
                    // dp = dy · vᵀ
                    product(
                        (dm.tq, dm.tk, dm.d),
                        dp.as_mut_ptr(),
                        (dm.tk, 1),
                        dy.as_ptr().add(ya),
                        (width, 1),
                        v.as_ptr().add(va),
                        (1, dm.kv_row),
                        false,
                        1,
                    );
                }
                // The softmax backward, with the score scale folded in: ds = p ⊙ (dp − p·dp).
                softmax_bwd_rows(p, dp, dm.tk, self.scale);
                // SAFETY: as above.
                unsafe {
                    // dq = ds · k
                    product(
                        (dm.tq, dm.d, dm.tk),
                        dq_p.at(qa),
                        (dm.q_row, 1),
                        dp.as_ptr(),
                        (dm.tk, 1),
                        k.as_ptr().add(ka),
                        (dm.kv_row, 1),
                        false,
                        1,
                    );
                    // dk = dsᵀ · q
                    product(
                        (dm.tk, dm.d, dm.tq),
                        dk_p.at(ka),
                        (dm.kv_row, 1),
                        dp.as_ptr(),
                        (1, dm.tk),
                        q.as_ptr().add(qa),
                        (dm.q_row, 1),
                        false,
                        1,
                    );
                }
            },
        );
    }
}

/// q, k, v as three tensors.
struct AttentionOp(Heads);

/// The sizes of q, k, v split into `heads` heads, or why they do not fit.
fn dims(heads: usize, q: &Layout, k: &Layout, v: &Layout) -> Result<Dims> {
    let (b, tq, row) = q.shape().dims3()?;
    let (bk, tk, rk) = k.shape().dims3()?;
    if bk != b || rk != row || v.shape().dims() != k.shape().dims() {
        bail!(
            "attention: q {:?}, k {:?}, v {:?} do not fit",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if heads == 0 || row % heads != 0 {
        bail!("attention: width {row} is not a multiple of {heads} heads");
    }
    Ok(Dims {
        b,
        tq,
        tk,
        h: heads,
        d: row / heads,
        q_row: row,
        kv_row: row,
        cols: [0; 3],
    })
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "vlalign-attention"
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
        let dm = dims(self.0.heads, l1, l2, l3)?;
        let (q, k, v) = (
            f32s(s1, l1, "attention q")?,
            f32s(s2, l2, "attention k")?,
            f32s(s3, l3, "attention v")?,
        );
        Ok((
            CpuStorage::F32(self.0.forward(dm, q, k, v)),
            l1.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        if dy.dims() != q.dims() {
            bail!(
                "attention backward: gradient {:?} for output {:?}",
                dy.dims(),
                q.dims()
            );
        }
        let dm = dims(self.0.heads, q.layout(), k.layout(), v.layout())?;
        let (mut dq, mut dk, mut dv) = (
            Vec::with_capacity(q.elem_count()),
            Vec::with_capacity(k.elem_count()),
            Vec::with_capacity(v.elem_count()),
        );
        let out = [
            Out(dq.as_mut_ptr()),
            Out(dk.as_mut_ptr()),
            Out(dv.as_mut_ptr()),
        ];
        with_f32s(
            [q, k, v, &dy],
            "attention backward operand",
            |[qs, ks, vs, g]| {
                self.0.backward(dm, (qs, ks, vs), g, out);
                Ok(())
            },
        )?;
        // SAFETY: backward wrote every element of each (all heads of all rows).
        unsafe {
            dq.set_len(q.elem_count());
            dk.set_len(k.elem_count());
            dv.set_len(v.elem_count());
        }
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, k.shape(), dev)?),
            Some(Tensor::from_vec(dv, v.shape(), dev)?),
        ))
    }
}

/// Self-attention over one packed projection `[b, t, 3·h·d]` (q, k, v side by side in each row).
struct PackedOp(Heads);

fn packed_dims(heads: usize, qkv: &Layout) -> Result<Dims> {
    let (b, t, w3) = qkv.shape().dims3()?;
    packed_dims_of((b, t, w3), heads)
}

/// The sizes of a packed projection `[b, t, w3]` split into `heads` heads.
fn packed_dims_of((b, t, w3): (usize, usize, usize), heads: usize) -> Result<Dims> {
    let width = w3 / 3;
    if w3 % 3 != 0 || heads == 0 || width % heads != 0 {
        bail!("attention: packed width {w3} is not 3 × a multiple of {heads} heads");
    }
    Ok(Dims {
        b,
        tq: t,
        tk: t,
        h: heads,
        d: width / heads,
        q_row: w3,
        kv_row: w3,
        cols: [0, width, 2 * width],
    })
}

impl CustomOp1 for PackedOp {
    fn name(&self) -> &'static str {
        "vlalign-attention-packed"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dm = packed_dims(self.0.heads, l)?;
        let qkv = f32s(s, l, "attention qkv")?;
        let y = self.0.forward(dm, qkv, qkv, qkv);
        Ok((CpuStorage::F32(y), Shape::from((dm.b, dm.tq, dm.width()))))
    }

    fn bwd(&self, qkv: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let dy = dy.contiguous()?;
        if dy.dims() != y.dims() {
            bail!(
                "attention backward: gradient {:?} for output {:?}",
                dy.dims(),
                y.dims()
            );
        }
        let dm = packed_dims(self.0.heads, qkv.layout())?;
        let dqkv = with_f32s([qkv, &dy], "attention backward operand", |[s, g]| {
            Ok(self.0.packed_backward(dm, s, g))
        })?;
        Ok(Some(Tensor::from_vec(dqkv, qkv.shape(), qkv.device())?))
    }
}

impl Heads {
    /// The gradient of a packed projection (laid out as it) for the output gradient `dy`.
    fn packed_backward(&self, dm: Dims, qkv: &[f32], dy: &[f32]) -> Vec<f32> {
        let len = dm.b * dm.tq * dm.q_row;
        let mut dqkv = Vec::with_capacity(len);
        self.backward(dm, (qkv, qkv, qkv), dy, [Out(dqkv.as_mut_ptr()); 3]);
        // SAFETY: backward wrote every element (the q, k and v columns of all heads of all rows).
        unsafe { dqkv.set_len(len) };
        dqkv
    }
}

/// Self-attention over a packed projection, for a caller that holds the slices (the fused
/// encoder layer): sizes `[b, t, 3·width]`, `heads` heads, an additive mask as [`attention`]'s.
pub(super) struct PackedSlices {
    dims: Dims,
    heads: Heads,
}

impl PackedSlices {
    pub(super) fn new(
        (b, t, width): (usize, usize, usize),
        heads: usize,
        mask: Option<&Tensor>,
    ) -> Result<Self> {
        let dims = packed_dims_of((b, t, 3 * width), heads)?;
        Ok(Self {
            dims,
            heads: Heads::new(dims, mask)?,
        })
    }

    /// `[b, t, width]` from `qkv` `[b, t, 3·width]`.
    pub(super) fn forward(&self, qkv: &[f32]) -> Vec<f32> {
        self.heads.forward(self.dims, qkv, qkv, qkv)
    }

    /// The gradient of `qkv` for the output gradient `dy`.
    pub(super) fn backward(&self, qkv: &[f32], dy: &[f32]) -> Vec<f32> {
        self.heads.packed_backward(self.dims, qkv, dy)
    }
}

/// Cross-attention over slices, for a caller that holds them (the fused post-LN attention
/// block): queries `q` `[b, tq, width]`, keys and values side by side in `kv` `[b, tk, 2·width]`
/// (one product with the two weights stacked), `heads` heads, an additive mask as
/// [`attention`]'s.
pub(super) struct CrossSlices {
    dims: Dims,
    heads: Heads,
}

impl CrossSlices {
    pub(super) fn new(
        (b, tq, tk, width): (usize, usize, usize, usize),
        heads: usize,
        mask: Option<&Tensor>,
    ) -> Result<Self> {
        if heads == 0 || width % heads != 0 {
            bail!("attention: width {width} is not a multiple of {heads} heads");
        }
        let dims = Dims {
            b,
            tq,
            tk,
            h: heads,
            d: width / heads,
            q_row: width,
            kv_row: 2 * width,
            cols: [0, 0, width],
        };
        Ok(Self {
            dims,
            heads: Heads::new(dims, mask)?,
        })
    }

    /// `[b, tq, width]`.
    pub(super) fn forward(&self, q: &[f32], kv: &[f32]) -> Vec<f32> {
        self.heads.forward(self.dims, q, kv, kv)
    }

    /// The gradients of `q` and `kv` for the output gradient `dy`, laid out as they are.
    pub(super) fn backward(&self, q: &[f32], kv: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let mut dq = Vec::with_capacity(q.len());
        let mut dkv = Vec::with_capacity(kv.len());
        let (q_p, kv_p) = (Out(dq.as_mut_ptr()), Out(dkv.as_mut_ptr()));
        self.heads
            .backward(self.dims, (q, kv, kv), dy, [q_p, kv_p, kv_p]);
        // SAFETY: backward wrote every element of both (all heads of all rows; the k and v
        // columns of kv).
        unsafe {
            dq.set_len(q.len());
            dkv.set_len(kv.len());
        }
        (dq, dkv)
    }
}

/// Whether [`attention`] runs for these inputs: float32 on the CPU.
pub fn supported(q: &Tensor) -> bool {
    q.dtype() == candle_core::DType::F32 && q.device().is_cpu()
}

/// softmax(q kᵀ · d^-½ + mask) v over `heads` heads, differentiable in q, k and v (not the
/// mask). q `[B, Tq, H·d]`, k and v `[B, Tk, H·d]`, mask additive, broadcasting to
/// `[B, H, Tq, Tk]`; returns `[B, Tq, H·d]`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let dm = dims(heads, q.layout(), k.layout(), v.layout())?;
    q.apply_op3(&k, &v, AttentionOp(Heads::new(dm, mask)?))
}

/// Self-attention as [`attention`] over one packed projection `qkv` `[B, T, 3·H·d]` (q, k, v
/// side by side in each row, as one linear layer with the three weights stacked produces them):
/// no split copies forward, and one gradient tensor backward, so the three projections'
/// input gradients are one product. Returns `[B, T, H·d]`.
pub fn attention_packed(qkv: &Tensor, heads: usize, mask: Option<&Tensor>) -> Result<Tensor> {
    let qkv = qkv.contiguous()?;
    let dm = packed_dims(heads, qkv.layout())?;
    qkv.apply_op1(PackedOp(Heads::new(dm, mask)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn rel(a: &Tensor, c: &Tensor) -> f32 {
        crate::nn::fused::rel(a, c).unwrap()
    }

    /// Values and q/k/v gradients against the op-by-op composition, for self- and
    /// cross-attention (self-attention also over the packed `[q | k | v]` projection) and every
    /// mask broadcast the models use (padding `[B,1,1,Tk]`, causal
    /// `[1,1,Tq,Tk]`, per-sample `[B,1,Tq,Tk]` with fully blocked rows).
    #[test]
    fn fused_attention_matches_the_composition() {
        let dev = Device::Cpu;
        let (b, heads, d) = (3, 4, 16);
        for (tq, tk) in [(7, 7), (5, 11)] {
            let var = |t: usize| {
                Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, t, heads * d), &dev).unwrap())
                    .unwrap()
            };
            let (q, k, v) = (var(tq), var(tk), var(tk));
            let probe = Tensor::randn(0f32, 1.0, (b, tq, heads * d), &dev).unwrap();
            let blocked = super::super::attention::MASKED;
            let pad: Vec<f32> = (0..b * tk)
                .map(|i| if i % tk >= tk - i / tk { blocked } else { 0.0 })
                .collect();
            let causal: Vec<f32> = (0..tq * tk)
                .map(|i| if i % tk > i / tk { blocked } else { 0.0 })
                .collect();
            let mut per: Vec<f32> = (0..b * tq * tk)
                .map(|i| if (i * 7) % 5 == 0 { blocked } else { 0.0 })
                .collect();
            per[..tk].iter_mut().for_each(|m| *m = blocked); // one fully blocked row
            let masks = [
                None,
                Some(Tensor::from_vec(pad, (b, 1, 1, tk), &dev).unwrap()),
                Some(Tensor::from_vec(causal, (1, 1, tq, tk), &dev).unwrap()),
                Some(Tensor::from_vec(per, (b, 1, tq, tk), &dev).unwrap()),
            ];
            for mask in masks.iter() {
                let (qt, kt, vt) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
                let yf = attention(qt, kt, vt, heads, mask.as_ref()).unwrap();
                let yc =
                    super::super::attention::composed(qt, kt, vt, heads, mask.as_ref()).unwrap();
                assert!(rel(&yf, &yc) < 1e-5, "values {}", rel(&yf, &yc));
                // Gradients of Σ y ⊙ probe.
                let grads = |y: &Tensor| (y * &probe).unwrap().sum_all().unwrap().backward();
                let gc = grads(&yc).unwrap();
                let mut runs = vec![("fused", yf)];
                if tq == tk {
                    // Self-attention over the packed projection [q | k | v].
                    let qkv = Tensor::cat(&[qt, kt, vt], 2).unwrap();
                    runs.push((
                        "packed",
                        attention_packed(&qkv, heads, mask.as_ref()).unwrap(),
                    ));
                }
                for (run, y) in runs {
                    assert!(rel(&y, &yc) < 1e-5, "{run} values {}", rel(&y, &yc));
                    let g = grads(&y).unwrap();
                    for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
                        let (a, c) = (g.get(x).unwrap(), gc.get(x).unwrap());
                        assert!(rel(a, c) < 1e-4, "{run} {tq}x{tk} d{name}: {}", rel(a, c));
                    }
                }
            }
        }
    }

    #[test]
    fn a_mask_that_does_not_broadcast_is_an_error() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 3, 8), candle_core::DType::F32, &dev).unwrap();
        let m = Tensor::zeros((2, 1, 4, 3), candle_core::DType::F32, &dev).unwrap();
        let e = attention(&x, &x, &x, 2, Some(&m)).unwrap_err().to_string();
        assert!(e.contains("does not broadcast"), "{e}");
    }
}
