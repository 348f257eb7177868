//! Content-defined chunking with a gear rolling hash (in the style of FastCDC).
//!
//! A boundary is placed after byte `i` when the gear hash of the bytes before it has
//! its top bits clear (a mask of about log2(avg) bits). The hash only depends on the last 64 bytes, so inserting
//! or removing bytes in a file moves the boundaries near the edit and nowhere else: a
//! tar archive whose members shift keeps most of its chunks. Chunks are between
//! `avg / 4` and `avg * 4` bytes; a stricter mask before `avg` and a looser one after it
//! ("normalised chunking") keep lengths close to `avg`.

use std::io::{self, Read};

/// Gear table: 256 pseudo-random 64-bit values, fixed forever (boundaries depend on it).
const GEAR: [u64; 256] = gear_table();

const fn gear_table() -> [u64; 256] {
    let mut table = [0u64; 256];
    let mut state: u64 = 0x4365_7274_6f43_4443; // "CertoCDC"
    let mut i = 0;
    while i < 256 {
        // splitmix64
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        table[i] = z ^ (z >> 31);
        i += 1;
    }
    table
}

/// Chunk size bounds and masks derived from the average size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkParams {
    /// Smallest chunk (except the last one of the input).
    pub min: usize,
    /// Target average.
    pub avg: usize,
    /// Largest chunk.
    pub max: usize,
    mask_small: u64,
    mask_large: u64,
}

impl ChunkParams {
    /// Whether `avg` is an accepted average size: a power of two in 1 KiB..=1 MiB.
    pub fn valid_avg(avg: u32) -> bool {
        avg.is_power_of_two() && (1024..=1 << 20).contains(&avg)
    }

    /// Parameters for an accepted average size (see [`valid_avg`](Self::valid_avg)).
    pub fn new(avg: u32) -> Self {
        let bits = avg.trailing_zeros();
        let high = |n: u32| !0u64 << (64 - n);
        Self {
            min: avg as usize / 4,
            avg: avg as usize,
            max: avg as usize * 4,
            mask_small: high(bits + 2),
            mask_large: high(bits - 2),
        }
    }

    /// Length of the chunk starting at `data[0]`; `data` holds at least `max` bytes unless
    /// it is the end of the input.
    pub fn cut(&self, data: &[u8]) -> usize {
        let n = data.len();
        if n <= self.min {
            return n;
        }
        let end = n.min(self.max);
        let normal = self.avg.min(end);
        let mut h: u64 = 0;
        let mut i = self.min;
        while i < normal {
            h = (h << 1).wrapping_add(GEAR[data[i] as usize]);
            if h & self.mask_small == 0 {
                return i + 1;
            }
            i += 1;
        }
        while i < end {
            h = (h << 1).wrapping_add(GEAR[data[i] as usize]);
            if h & self.mask_large == 0 {
                return i + 1;
            }
            i += 1;
        }
        end
    }
}

/// Streams a reader through [`ChunkParams::cut`] with one buffer of a few `max` sizes.
#[derive(Debug)]
pub struct Chunker {
    params: ChunkParams,
    buf: Vec<u8>,
}

impl Chunker {
    /// A chunker for `params`.
    pub fn new(params: ChunkParams) -> Self {
        Self {
            params,
            buf: vec![0u8; (params.max * 4).max(1 << 20)],
        }
    }

    /// Calls `each` with every chunk of `reader`, in order. On a read error, returns the
    /// offset of the failing read and the error.
    pub fn run(
        &mut self,
        reader: &mut impl Read,
        mut each: impl FnMut(&[u8]),
    ) -> Result<(), (u64, io::Error)> {
        let (mut start, mut end) = (0usize, 0usize);
        let mut consumed = 0u64; // input offset of buf[0]
        let mut eof = false;
        loop {
            if !eof && end - start < self.params.max {
                self.buf.copy_within(start..end, 0);
                consumed += start as u64;
                end -= start;
                start = 0;
                let got = fill(reader, &mut self.buf[end..])
                    .map_err(|(done, e)| (consumed + (end + done) as u64, e))?;
                eof = end + got < self.buf.len();
                end += got;
            }
            if start == end {
                return Ok(());
            }
            let len = self.params.cut(&self.buf[start..end]);
            each(&self.buf[start..start + len]);
            start += len;
        }
    }
}

/// Reads until `buf` is full or the reader is at its end; returns the bytes read, or the
/// bytes read before the error together with the error.
pub(crate) fn fill(reader: &mut impl Read, buf: &mut [u8]) -> Result<usize, (usize, io::Error)> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err((filled, e)),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(data: &[u8], avg: u32) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        Chunker::new(ChunkParams::new(avg))
            .run(&mut &data[..], |c| out.push(c.to_vec()))
            .expect("in-memory read");
        out
    }

    fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (s >> 56) as u8
            })
            .collect()
    }

    #[test]
    fn average_chunk_size_is_near_the_target() {
        let data = pseudo_random(4 << 20, 1);
        let c = chunks(&data, 16384);
        let avg = data.len() / c.len();
        assert!((8192..=32768).contains(&avg), "average {avg}");
        assert_eq!(c.concat(), data);
    }

    #[test]
    fn an_insertion_only_moves_nearby_boundaries() {
        let data = pseudo_random(2 << 20, 2);
        let mut edited = data[..700_000].to_vec();
        edited.extend_from_slice(b"a few inserted bytes");
        edited.extend_from_slice(&data[700_000..]);
        let before: std::collections::HashSet<Vec<u8>> = chunks(&data, 8192).into_iter().collect();
        let after = chunks(&edited, 8192);
        let shared = after.iter().filter(|c| before.contains(*c)).count();
        assert!(
            shared + 3 >= after.len(),
            "{shared} of {} chunks kept",
            after.len()
        );
    }
}
