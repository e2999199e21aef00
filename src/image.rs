//! Images in and out: 8-bit RGB PNG files <-> (1, 3, H, W) f32 tensors in [-1, 1], the range the
//! VAE reads and writes (diffusers' `image * 2 - 1` and `(image / 2 + 0.5).clamp(0, 1)`).

use std::io::BufWriter;
use std::path::Path;

use crate::{Error, Result, Tensor};

/// Read a PNG (RGB, RGBA, grey; 8 or 16 bit) as (1, 3, H, W) in [-1, 1].
pub fn load_png(path: impl AsRef<Path>) -> Result<Tensor> {
    let path = path.as_ref();
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut decoder = png::Decoder::new(std::io::BufReader::new(file));
    // 8-bit samples, palettes expanded.
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder
        .read_info()
        .map_err(|e| Error::format(path, format!("not a readable PNG: {e}")))?;
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| Error::format(path, "PNG too large"))?;
    let mut buf = vec![0u8; size];
    let info = reader
        .next_frame(&mut buf)
        .map_err(|e| Error::format(path, format!("corrupt PNG: {e}")))?;
    let (w, h) = (info.width as usize, info.height as usize);
    let channels = match info.color_type {
        png::ColorType::Grayscale => 1,
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        png::ColorType::Indexed => return Err(Error::format(path, "indexed PNG was not expanded")),
    };
    let mut out = vec![0f32; 3 * h * w];
    for p in 0..h * w {
        for c in 0..3 {
            let src = if channels < 3 { 0 } else { c };
            out[c * h * w + p] = buf[p * channels + src] as f32 / 127.5 - 1.0;
        }
    }
    Tensor::from_vec(out, &[1, 3, h, w])
}

/// Write a (1, 3, H, W) image in [-1, 1] as an 8-bit RGB PNG (clamped, rounded).
pub fn save_png(image: &Tensor, path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    let rgb = to_rgb8(image)?;
    let (h, w) = (image.shape()[2], image.shape()[3]);
    let tmp = path.with_extension("png.tmp");
    let file = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let mut enc = png::Encoder::new(BufWriter::new(file), w as u32, h as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let err = |e: png::EncodingError| Error::format(&tmp, format!("writing PNG: {e}"));
    let mut writer = enc.write_header().map_err(err)?;
    writer.write_image_data(&rgb).map_err(err)?;
    writer.finish().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// A (1, 3, H, W) image in [-1, 1] as row-major RGB bytes (clamped, rounded), as a PNG holds it.
pub fn to_rgb8(image: &Tensor) -> Result<Vec<u8>> {
    let s = image.shape();
    if s.len() != 4 || s[0] != 1 || s[1] != 3 {
        return Err(Error::shape(
            "to_rgb8",
            format!("image {s:?} must be (1, 3, H, W)"),
        ));
    }
    let hw = s[2] * s[3];
    let v = image.to_vec::<f32>()?;
    let mut rgb = vec![0u8; 3 * hw];
    for p in 0..hw {
        for c in 0..3 {
            let x = ((v[c * hw + p] + 1.0) * 0.5).clamp(0.0, 1.0);
            rgb[p * 3 + c] = (x * 255.0).round() as u8;
        }
    }
    Ok(rgb)
}

/// Row-major RGB bytes (`h * w * 3`) as a (1, 3, h, w) image in [-1, 1]; [`to_rgb8`] inverts it
/// exactly.
pub fn from_rgb8(rgb: &[u8], h: usize, w: usize) -> Result<Tensor> {
    if rgb.len() != 3 * h * w {
        return Err(Error::shape(
            "from_rgb8",
            format!("{} bytes for a {h}x{w} RGB image", rgb.len()),
        ));
    }
    let mut out = vec![0f32; 3 * h * w];
    for p in 0..h * w {
        for c in 0..3 {
            out[c * h * w + p] = rgb[p * 3 + c] as f32 / 127.5 - 1.0;
        }
    }
    Tensor::from_vec(out, &[1, 3, h, w])
}

/// Peak signal-to-noise ratio in dB of two images in [-1, 1], measured on the 8-bit values a PNG
/// would hold (as the reference's PSNR of PIL images).
pub fn psnr(a: &Tensor, b: &Tensor) -> Result<f64> {
    if a.shape() != b.shape() {
        return Err(Error::shape(
            "psnr",
            format!("{:?} vs {:?}", a.shape(), b.shape()),
        ));
    }
    let q = |x: f32| (((x + 1.0) * 0.5).clamp(0.0, 1.0) * 255.0).round() as f64;
    let (va, vb) = (a.to_vec::<f32>()?, b.to_vec::<f32>()?);
    let mse = va
        .iter()
        .zip(&vb)
        .map(|(&x, &y)| (q(x) - q(y)).powi(2))
        .sum::<f64>()
        / va.len().max(1) as f64;
    Ok(if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64 * 255.0 / mse).log10()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Round trip: 8-bit values survive save and load exactly; PSNR of an image with itself is
    /// infinite and of a one-level change everywhere is 20 log10(255) = 48.13 dB.
    #[test]
    fn png_round_trip_and_psnr() {
        let levels: Vec<f32> = (0..3 * 5 * 4)
            .map(|i| ((i * 37) % 256) as f32 / 127.5 - 1.0)
            .collect();
        let img = Tensor::from_vec(levels, &[1, 3, 5, 4]).unwrap();
        let path = std::env::temp_dir().join(format!("steer-png-{}.png", std::process::id()));
        save_png(&img, &path).unwrap();
        let back = load_png(&path).unwrap();
        assert!(back.rel_error(&img).unwrap() < 1e-6);
        assert_eq!(psnr(&img, &back).unwrap(), f64::INFINITY);
        let shifted: Vec<f32> = img
            .to_vec::<f32>()
            .unwrap()
            .iter()
            .map(|&x| {
                if x < 0.99 {
                    x + 1.0 / 127.5
                } else {
                    x - 1.0 / 127.5
                }
            })
            .collect();
        let p = psnr(&img, &Tensor::from_vec(shifted, &[1, 3, 5, 4]).unwrap()).unwrap();
        assert!((p - 48.1308).abs() < 1e-3, "{p}");
        assert!(load_png("/nonexistent.png")
            .unwrap_err()
            .to_string()
            .contains("nonexistent"));
    }
}
