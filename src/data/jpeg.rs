//! JPEG decoding through libjpeg-turbo's decoder (as built by mozjpeg-sys, C only), the decoder
//! PIL uses: the same integer IDCT, fancy chroma upsampling and YCbCr conversion give bit-exact
//! pixels to `PIL.Image.open(...).convert("RGB")` (checked on the fixtures), where pure-Rust
//! decoders differed by up to 4 levels in ~15% of values.
//!
//! libjpeg reports fatal errors through a callback that must not return; the `mozjpeg` crate
//! unwinds from it, so decoding runs under `catch_unwind`. A file that ends early is an error,
//! as in PIL, rather than an image padded with grey.

use std::cell::Cell;
use std::os::raw::c_int;
use std::panic::{catch_unwind, AssertUnwindSafe};

use mozjpeg_sys::{jpeg_common_struct, jpeg_error_mgr, jpeg_std_error, JWRN_JPEG_EOF};

thread_local! {
    static TRUNCATED: Cell<bool> = const { Cell::new(false) };
}

/// True when the bytes start with a JPEG SOI marker.
pub fn is_jpeg(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0xFF, 0xD8, 0xFF])
}

fn message(cinfo: &mut jpeg_common_struct) -> String {
    // SAFETY: libjpeg sets `err` before any callback runs.
    let (fmt, code) = unsafe { ((*cinfo.err).format_message, (*cinfo.err).msg_code) };
    let Some(fmt) = fmt else {
        return format!("libjpeg error code {code}");
    };
    type Formatter = unsafe extern "C-unwind" fn(&mut jpeg_common_struct, &mut [u8; 80]);
    let mut buf = [0u8; 80];
    // SAFETY: C's format_message writes at most JMSG_LENGTH_MAX (80) bytes into its buffer;
    // mozjpeg-sys declares that parameter `&[u8; 80]`, so it is called with the mutable type.
    unsafe {
        let fmt: Formatter = std::mem::transmute(fmt);
        fmt(cinfo, &mut buf);
    }
    let end = buf.iter().position(|&c| c == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

unsafe extern "C-unwind" fn on_fatal(cinfo: &mut jpeg_common_struct) {
    std::panic::resume_unwind(Box::new(message(cinfo)));
}

unsafe extern "C-unwind" fn on_message(cinfo: &mut jpeg_common_struct, level: c_int) {
    // SAFETY: as in `message`.
    if level < 0 && unsafe { (*cinfo.err).msg_code } == JWRN_JPEG_EOF as c_int {
        TRUNCATED.with(|t| t.set(true));
    }
}

/// PIL's reading of a CMYK (or YCCK, which libjpeg turns into CMYK) JPEG, then its
/// `convert("RGB")`: PIL assumes Adobe's inverted CMYK (JpegImagePlugin, rawmode "CMYK;I"), and
/// Convert.c's `cmyk2rgb` gives each channel (255 − k) − x·(255 − k)/255 with its rounded
/// fixed-point division by 255. Checked against Pillow on tests/fixtures/images.
fn adobe_cmyk_to_rgb(stored: [u8; 4]) -> [u8; 3] {
    let [c, m, y, k] = stored.map(|v| 255 - u32::from(v));
    let nk = 255 - k;
    let channel = |x: u32| {
        let t = x * nk + 128;
        (nk - (((t >> 8) + t) >> 8)) as u8
    };
    [channel(c), channel(m), channel(y)]
}

/// Decodes to interleaved RGB8 `(width, height, data)`; grayscale is replicated to RGB, CMYK
/// and YCCK are converted as PIL does.
/// `check(width, height)` runs on the header, before any pixel is decoded or allocated.
pub fn decode(
    bytes: &[u8],
    check: impl Fn(usize, usize) -> Result<(), String>,
) -> Result<(usize, usize, Vec<u8>), String> {
    TRUNCATED.with(|t| t.set(false));
    let run = catch_unwind(AssertUnwindSafe(|| -> std::io::Result<_> {
        // SAFETY: jpeg_std_error fills every field of a zeroed manager.
        let mut err: jpeg_error_mgr = unsafe { std::mem::zeroed() };
        unsafe { jpeg_std_error(&mut err) };
        err.error_exit = Some(on_fatal);
        err.emit_message = Some(on_message);
        let header = mozjpeg::Decompress::with_err(err).from_mem(bytes)?;
        check(header.width(), header.height()).map_err(std::io::Error::other)?;
        let four_channel = matches!(
            header.color_space(),
            mozjpeg::ColorSpace::JCS_CMYK | mozjpeg::ColorSpace::JCS_YCCK
        );
        if four_channel {
            let mut cmyk = header.to_colorspace(mozjpeg::ColorSpace::JCS_CMYK)?;
            let (w, h) = (cmyk.width(), cmyk.height());
            let px: Vec<[u8; 4]> = cmyk.read_scanlines()?;
            cmyk.finish()?;
            return Ok((w, h, px.into_iter().map(adobe_cmyk_to_rgb).collect()));
        }
        let mut rgb = header.rgb()?;
        let (w, h) = (rgb.width(), rgb.height());
        let px: Vec<[u8; 3]> = rgb.read_scanlines()?;
        rgb.finish()?;
        Ok((w, h, px))
    }));
    let (w, h, px) = match run {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => return Err(format!("JPEG: {e}")),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .unwrap_or_else(|| "JPEG decoder failed".into());
            return Err(format!("JPEG: {msg}"));
        }
    };
    if TRUNCATED.with(Cell::get) {
        return Err("JPEG: image file is truncated".into());
    }
    if px.len() != w * h {
        return Err(format!("JPEG: decoded {} pixels for {w}x{h}", px.len()));
    }
    Ok((w, h, px.into_iter().flatten().collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Encodes interleaved CMYK pixels (stored as Adobe writes them: inverted) with libjpeg in
    /// the given JPEG colour space.
    fn encode(cmyk: &[u8], w: usize, h: usize, space: mozjpeg::ColorSpace) -> Vec<u8> {
        let mut c = mozjpeg::Compress::new(mozjpeg::ColorSpace::JCS_CMYK);
        c.set_size(w, h);
        c.set_color_space(space);
        c.set_quality(100.0);
        let mut started = c.start_compress(Vec::new()).unwrap();
        started.write_scanlines(cmyk).unwrap();
        started.finish().unwrap()
    }

    /// YCCK (Adobe transform 2) reaches the same RGB as plain CMYK: libjpeg turns it into CMYK
    /// before `adobe_cmyk_to_rgb`, as in PIL. Pillow itself only writes plain CMYK, which
    /// tests/preprocess.rs checks bit-exactly against it.
    #[test]
    fn ycck_decodes_like_cmyk() {
        let (w, h) = (16, 8);
        // Smooth, so that JPEG's chroma subsampling of YCCK loses little.
        let cmyk: Vec<u8> = (0..w * h)
            .flat_map(|i| {
                let (x, y) = (i % w, i / w);
                [x * 12, y * 25, 90 + x * 3, 40 + (x + y) * 4].map(|v| v as u8)
            })
            .collect();
        let plain = encode(&cmyk, w, h, mozjpeg::ColorSpace::JCS_CMYK);
        let ycck = encode(&cmyk, w, h, mozjpeg::ColorSpace::JCS_YCCK);
        let ok = |_: usize, _: usize| Ok(());
        let (_, _, a) = decode(&plain, ok).unwrap();
        let (_, _, b) = decode(&ycck, ok).unwrap();
        let worst = a.iter().zip(&b).map(|(x, y)| x.abs_diff(*y)).max().unwrap();
        assert!(worst <= 8, "YCCK and CMYK differ by {worst} levels");
    }

    /// Hand-derived: stored (inverted) CMYK (245, 55, 225, 215) is C,M,Y,K = (10, 200, 30, 40);
    /// Pillow gives RGB (207, 46, 190) for it.
    #[test]
    fn cmyk_conversion_matches_pillow_by_hand() {
        assert_eq!(adobe_cmyk_to_rgb([245, 55, 225, 215]), [207, 46, 190]);
        assert_eq!(adobe_cmyk_to_rgb([255, 255, 255, 255]), [255, 255, 255]);
        assert_eq!(adobe_cmyk_to_rgb([0, 0, 0, 0]), [0, 0, 0]);
    }
}
