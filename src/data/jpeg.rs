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

/// Decodes to interleaved RGB8 `(width, height, data)`; grayscale is replicated to RGB.
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
