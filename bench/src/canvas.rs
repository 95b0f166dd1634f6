//! A small palette canvas for the bench's plots: lines, filled boxes and 5×7 text (descenders below) drawn into
//! one byte per pixel, written out as an indexed-colour PNG (zlib from `miniz_oxide`, the chunk
//! CRCs here). Enough for axes, ticks, labels and a few series; nothing is anti-aliased.

/// The palette; a pixel holds the index of its colour.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Colour {
    White = 0,
    Black = 1,
    Grid = 2,
    Blue = 3,
    Red = 4,
    Green = 5,
    Grey = 6,
}

const PALETTE: [[u8; 3]; 7] =
    [[255, 255, 255], [0, 0, 0], [225, 225, 225], [31, 90, 200], [210, 40, 40], [30, 150, 60], [140, 140, 140]];

/// A `width` × `height` image, top row first.
pub struct Canvas {
    pub width: usize,
    pub height: usize,
    pixels: Vec<u8>,
}

impl Canvas {
    /// A white canvas.
    pub fn new(width: usize, height: usize) -> Self {
        Self { width, height, pixels: vec![Colour::White as u8; width * height] }
    }

    /// The colour index at (`x`, `y`), or `None` outside the canvas.
    pub fn get(&self, x: i64, y: i64) -> Option<u8> {
        self.index(x, y).map(|i| self.pixels[i])
    }

    fn index(&self, x: i64, y: i64) -> Option<usize> {
        (x >= 0 && y >= 0 && (x as usize) < self.width && (y as usize) < self.height)
            .then(|| y as usize * self.width + x as usize)
    }

    /// Sets one pixel; outside the canvas it does nothing.
    pub fn set(&mut self, x: i64, y: i64, c: Colour) {
        if let Some(i) = self.index(x, y) {
            self.pixels[i] = c as u8;
        }
    }

    /// Fills the box from (`x0`, `y0`) to (`x1`, `y1`), both included.
    pub fn fill(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: Colour) {
        for y in y0.min(y1)..=y0.max(y1) {
            for x in x0.min(x1)..=x0.max(x1) {
                self.set(x, y, c);
            }
        }
    }

    /// A straight line `thick` pixels wide; `dash` > 0 draws `dash` pixels, skips `dash`.
    pub fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), thick: i64, dash: i64, c: Colour) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err, mut step) = (x0, y0, dx + dy, 0i64);
        loop {
            if dash == 0 || (step / dash) % 2 == 0 {
                self.fill(x - (thick - 1) / 2, y - (thick - 1) / 2, x + thick / 2, y + thick / 2, c);
            }
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
            step += 1;
        }
    }

    /// Pixel width of `text` at `scale`.
    pub fn text_width(text: &str, scale: i64) -> i64 {
        text.chars().count() as i64 * 6 * scale - scale
    }

    /// Writes `text` with its top-left corner at (`x`, `y`), each font pixel `scale` × `scale`.
    /// Characters outside printable ASCII show as `?`.
    pub fn text(&mut self, x: i64, y: i64, text: &str, scale: i64, c: Colour) {
        for (n, ch) in text.chars().enumerate() {
            let glyph = glyph(ch);
            let left = x + n as i64 * 6 * scale;
            for (col, bits) in glyph.iter().enumerate() {
                for row in 0..8 {
                    if bits >> row & 1 == 1 {
                        let (px, py) = (left + col as i64 * scale, y + row * scale);
                        self.fill(px, py, px + scale - 1, py + scale - 1, c);
                    }
                }
            }
        }
    }

    /// The image as a PNG file: 8-bit indexed colour, each row unfiltered, zlib-compressed.
    pub fn png(&self) -> Vec<u8> {
        let mut raw = Vec::with_capacity((self.width + 1) * self.height);
        for row in self.pixels.chunks(self.width) {
            raw.push(0); // filter: none
            raw.extend_from_slice(row);
        }
        let mut ihdr = Vec::with_capacity(13);
        ihdr.extend_from_slice(&(self.width as u32).to_be_bytes());
        ihdr.extend_from_slice(&(self.height as u32).to_be_bytes());
        ihdr.extend_from_slice(&[8, 3, 0, 0, 0]); // depth 8, indexed, deflate, no filter method, no interlace
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        chunk(&mut out, b"IHDR", &ihdr);
        chunk(&mut out, b"PLTE", &PALETTE.concat());
        chunk(&mut out, b"IDAT", &miniz_oxide::deflate::compress_to_vec_zlib(&raw, 9));
        chunk(&mut out, b"IEND", &[]);
        out
    }
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// CRC-32 (ISO-HDLC, as PNG chunks use), bit by bit: a plot is a few kilobytes of chunks.
pub fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// The glyph of `ch`: five columns, bit 0 the top row, bit 7 the descender row.
fn glyph(ch: char) -> [u8; 5] {
    let i = match ch {
        ' '..='~' => ch as usize - ' ' as usize,
        _ => '?' as usize - ' ' as usize,
    };
    FONT[i]
}

/// Printable ASCII, `' '` to `'~'`, in the classic 5×7 LCD font, with `g`, `j`, `p`, `q` and `y`
/// dropped into an eighth row.
#[rustfmt::skip]
const FONT: [[u8; 5]; 95] = [
    [0x00, 0x00, 0x00, 0x00, 0x00], [0x00, 0x00, 0x5F, 0x00, 0x00], [0x00, 0x07, 0x00, 0x07, 0x00],
    [0x14, 0x7F, 0x14, 0x7F, 0x14], [0x24, 0x2A, 0x7F, 0x2A, 0x12], [0x23, 0x13, 0x08, 0x64, 0x62],
    [0x36, 0x49, 0x55, 0x22, 0x50], [0x00, 0x05, 0x03, 0x00, 0x00], [0x00, 0x1C, 0x22, 0x41, 0x00],
    [0x00, 0x41, 0x22, 0x1C, 0x00], [0x08, 0x2A, 0x1C, 0x2A, 0x08], [0x08, 0x08, 0x3E, 0x08, 0x08],
    [0x00, 0x50, 0x30, 0x00, 0x00], [0x08, 0x08, 0x08, 0x08, 0x08], [0x00, 0x60, 0x60, 0x00, 0x00],
    [0x20, 0x10, 0x08, 0x04, 0x02], [0x3E, 0x51, 0x49, 0x45, 0x3E], [0x00, 0x42, 0x7F, 0x40, 0x00],
    [0x42, 0x61, 0x51, 0x49, 0x46], [0x21, 0x41, 0x45, 0x4B, 0x31], [0x18, 0x14, 0x12, 0x7F, 0x10],
    [0x27, 0x45, 0x45, 0x45, 0x39], [0x3C, 0x4A, 0x49, 0x49, 0x30], [0x01, 0x71, 0x09, 0x05, 0x03],
    [0x36, 0x49, 0x49, 0x49, 0x36], [0x06, 0x49, 0x49, 0x29, 0x1E], [0x00, 0x36, 0x36, 0x00, 0x00],
    [0x00, 0x56, 0x36, 0x00, 0x00], [0x08, 0x14, 0x22, 0x41, 0x00], [0x14, 0x14, 0x14, 0x14, 0x14],
    [0x00, 0x41, 0x22, 0x14, 0x08], [0x02, 0x01, 0x51, 0x09, 0x06], [0x32, 0x49, 0x79, 0x41, 0x3E],
    [0x7E, 0x11, 0x11, 0x11, 0x7E], [0x7F, 0x49, 0x49, 0x49, 0x36], [0x3E, 0x41, 0x41, 0x41, 0x22],
    [0x7F, 0x41, 0x41, 0x22, 0x1C], [0x7F, 0x49, 0x49, 0x49, 0x41], [0x7F, 0x09, 0x09, 0x09, 0x01],
    [0x3E, 0x41, 0x49, 0x49, 0x7A], [0x7F, 0x08, 0x08, 0x08, 0x7F], [0x00, 0x41, 0x7F, 0x41, 0x00],
    [0x20, 0x40, 0x41, 0x3F, 0x01], [0x7F, 0x08, 0x14, 0x22, 0x41], [0x7F, 0x40, 0x40, 0x40, 0x40],
    [0x7F, 0x02, 0x0C, 0x02, 0x7F], [0x7F, 0x04, 0x08, 0x10, 0x7F], [0x3E, 0x41, 0x41, 0x41, 0x3E],
    [0x7F, 0x09, 0x09, 0x09, 0x06], [0x3E, 0x41, 0x51, 0x21, 0x5E], [0x7F, 0x09, 0x19, 0x29, 0x46],
    [0x46, 0x49, 0x49, 0x49, 0x31], [0x01, 0x01, 0x7F, 0x01, 0x01], [0x3F, 0x40, 0x40, 0x40, 0x3F],
    [0x1F, 0x20, 0x40, 0x20, 0x1F], [0x3F, 0x40, 0x38, 0x40, 0x3F], [0x63, 0x14, 0x08, 0x14, 0x63],
    [0x07, 0x08, 0x70, 0x08, 0x07], [0x61, 0x51, 0x49, 0x45, 0x43], [0x00, 0x7F, 0x41, 0x41, 0x00],
    [0x02, 0x04, 0x08, 0x10, 0x20], [0x00, 0x41, 0x41, 0x7F, 0x00], [0x04, 0x02, 0x01, 0x02, 0x04],
    [0x40, 0x40, 0x40, 0x40, 0x40], [0x00, 0x01, 0x02, 0x04, 0x00], [0x20, 0x54, 0x54, 0x54, 0x78],
    [0x7F, 0x48, 0x44, 0x44, 0x38], [0x38, 0x44, 0x44, 0x44, 0x20], [0x38, 0x44, 0x44, 0x48, 0x7F],
    [0x38, 0x54, 0x54, 0x54, 0x18], [0x08, 0x7E, 0x09, 0x01, 0x02], [0x18, 0xA4, 0xA4, 0xA4, 0x7C],
    [0x7F, 0x08, 0x04, 0x04, 0x78], [0x00, 0x44, 0x7D, 0x40, 0x00], [0x40, 0x80, 0x84, 0x7D, 0x00],
    [0x7F, 0x10, 0x28, 0x44, 0x00], [0x00, 0x41, 0x7F, 0x40, 0x00], [0x7C, 0x04, 0x18, 0x04, 0x78],
    [0x7C, 0x08, 0x04, 0x04, 0x78], [0x38, 0x44, 0x44, 0x44, 0x38], [0xFC, 0x24, 0x24, 0x24, 0x18],
    [0x18, 0x24, 0x24, 0x24, 0xFC], [0x7C, 0x08, 0x04, 0x04, 0x08], [0x48, 0x54, 0x54, 0x54, 0x20],
    [0x04, 0x3F, 0x44, 0x40, 0x20], [0x3C, 0x40, 0x40, 0x20, 0x7C], [0x1C, 0x20, 0x40, 0x20, 0x1C],
    [0x3C, 0x40, 0x30, 0x40, 0x3C], [0x44, 0x28, 0x10, 0x28, 0x44], [0x1C, 0xA0, 0xA0, 0xA0, 0x7C],
    [0x44, 0x64, 0x54, 0x4C, 0x44], [0x00, 0x08, 0x36, 0x41, 0x00], [0x00, 0x00, 0x7F, 0x00, 0x00],
    [0x00, 0x41, 0x36, 0x08, 0x00], [0x08, 0x04, 0x08, 0x10, 0x08],
];

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The chunks of a PNG file (kind, data), each CRC checked.
    pub(crate) fn chunks(png: &[u8]) -> Vec<([u8; 4], Vec<u8>)> {
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let (mut at, mut out) = (8, Vec::new());
        while at < png.len() {
            let len = u32::from_be_bytes(png[at..at + 4].try_into().unwrap()) as usize;
            let body = &png[at + 4..at + 8 + len];
            let crc = u32::from_be_bytes(png[at + 8 + len..at + 12 + len].try_into().unwrap());
            assert_eq!(crc32(body), crc, "chunk CRC");
            out.push((body[..4].try_into().unwrap(), body[4..].to_vec()));
            at += 12 + len;
        }
        out
    }

    /// Decodes what [`Canvas::png`] writes back into (width, height, colour indices).
    pub(crate) fn decode(png: &[u8]) -> (usize, usize, Vec<u8>) {
        let chunks = chunks(png);
        let kinds: Vec<&[u8; 4]> = chunks.iter().map(|c| &c.0).collect();
        assert_eq!(kinds, [b"IHDR", b"PLTE", b"IDAT", b"IEND"]);
        let ihdr = &chunks[0].1;
        let w = u32::from_be_bytes(ihdr[0..4].try_into().unwrap()) as usize;
        let h = u32::from_be_bytes(ihdr[4..8].try_into().unwrap()) as usize;
        assert_eq!(&ihdr[8..], &[8, 3, 0, 0, 0]);
        assert_eq!(chunks[1].1.len(), PALETTE.len() * 3);
        let raw = miniz_oxide::inflate::decompress_to_vec_zlib(&chunks[2].1).expect("zlib stream");
        assert_eq!(raw.len(), (w + 1) * h);
        let mut px = Vec::with_capacity(w * h);
        for row in raw.chunks(w + 1) {
            assert_eq!(row[0], 0, "unfiltered rows");
            px.extend_from_slice(&row[1..]);
        }
        (w, h, px)
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn a_canvas_round_trips_through_its_png() {
        let mut c = Canvas::new(40, 20);
        c.line((0, 0), (39, 19), 1, 0, Colour::Red);
        c.fill(30, 2, 33, 4, Colour::Blue);
        c.text(2, 10, "1k", 1, Colour::Black);
        let (w, h, px) = decode(&c.png());
        assert_eq!((w, h), (40, 20));
        assert_eq!(px, c.pixels);
        assert_eq!(c.get(0, 0), Some(Colour::Red as u8));
        assert_eq!(c.get(39, 19), Some(Colour::Red as u8));
        assert_eq!(c.get(31, 3), Some(Colour::Blue as u8));
        assert_eq!(c.get(40, 0), None);
        // '1' has its full-height stem in its third column
        assert!((0..7).all(|r| c.get(4, 10 + r) == Some(Colour::Black as u8)));
    }

    #[test]
    fn dashes_leave_gaps_and_text_width_counts_the_spacing() {
        let mut c = Canvas::new(30, 3);
        c.line((0, 1), (29, 1), 1, 5, Colour::Grey);
        let on: Vec<bool> = (0..30).map(|x| c.get(x, 1) == Some(Colour::Grey as u8)).collect();
        assert!(on[..5].iter().all(|&b| b) && on[5..10].iter().all(|&b| !b) && on[10]);
        assert_eq!(Canvas::text_width("ab", 2), 22);
    }
}
