//! Huffman decoding of QPACK/HPACK string literals (RFC 7541, 5.2), a
//! nibble at a time: the code table comes from `httlib-huffman` (its
//! public copy of Appendix B), the decoder is a state machine built from it
//! once. Why not that crate's decoder: on the HTTP/3 click path it took 14%
//! of the shard's CPU (a click's path and query are long and Huffman-coded
//! by clients); this one walks a table of 4 096 entries, two lookups a byte.

use std::sync::OnceLock;

/// One transition: the next state, the symbol emitted on the way (if
/// `EMIT`), and whether the input is already invalid (`FAIL`: EOS decoded).
#[derive(Clone, Copy, Default)]
struct Step {
    next: u8,
    sym: u8,
    flags: u8,
}

const EMIT: u8 = 1;
const FAIL: u8 = 2;

struct Machine {
    /// `steps[state * 16 + nibble]`.
    steps: Vec<Step>,
    /// Per state: ending here is valid padding (the path from the root is
    /// at most 7 one-bits, RFC 7541 5.2).
    may_end: Vec<bool>,
}

fn machine() -> &'static Machine {
    static M: OnceLock<Machine> = OnceLock::new();
    M.get_or_init(build)
}

fn build() -> Machine {
    // The code tree: children of internal nodes; a leaf is -(symbol + 1).
    let mut tree: Vec<[i32; 2]> = vec![[0, 0]];
    for (sym, &(len, code)) in httlib_huffman::encoder::table::ENCODE_TABLE
        .iter()
        .enumerate()
    {
        let mut node = 0usize;
        for i in (0..len).rev() {
            let bit = ((code >> i) & 1) as usize;
            if i == 0 {
                tree[node][bit] = -(sym as i32 + 1);
            } else {
                if tree[node][bit] == 0 {
                    tree.push([0, 0]);
                    tree[node][bit] = tree.len() as i32 - 1;
                }
                node = tree[node][bit] as usize;
            }
        }
    }
    assert!(tree.len() <= 256, "one byte names a state");
    // Which internal nodes lie on an all-ones path, and how deep.
    let mut ones_depth = vec![None; tree.len()];
    let (mut node, mut depth) = (0usize, 0u8);
    loop {
        ones_depth[node] = Some(depth);
        let c = tree[node][1];
        if c <= 0 {
            break;
        }
        node = c as usize;
        depth += 1;
    }
    let mut steps = vec![Step::default(); tree.len() * 16];
    for state in 0..tree.len() {
        for nibble in 0..16u8 {
            let mut node = state;
            let mut step = Step::default();
            for i in (0..4).rev() {
                let c = tree[node][((nibble >> i) & 1) as usize];
                if c < 0 {
                    let sym = (-c - 1) as usize;
                    if sym == 256 {
                        step.flags |= FAIL;
                    } else {
                        step.sym = sym as u8;
                        step.flags |= EMIT;
                    }
                    node = 0;
                } else {
                    node = c as usize;
                }
            }
            step.next = node as u8;
            steps[state * 16 + nibble as usize] = step;
        }
    }
    let may_end = ones_depth
        .iter()
        .map(|d| d.is_some_and(|d| d <= 7))
        .collect();
    Machine { steps, may_end }
}

/// Appends the decoding of `src` to `dst`; Err on EOS in the data or
/// padding that is not 0-7 one-bits.
pub fn decode(src: &[u8], dst: &mut Vec<u8>) -> Result<(), ()> {
    let m = machine();
    let mut state = 0usize;
    dst.reserve(src.len() * 8 / 5);
    for &b in src {
        for nibble in [b >> 4, b & 0xf] {
            let s = m.steps[state * 16 + nibble as usize];
            if s.flags & FAIL != 0 {
                return Err(());
            }
            if s.flags & EMIT != 0 {
                dst.push(s.sym);
            }
            state = s.next as usize;
        }
    }
    if m.may_end[state] {
        Ok(())
    } else {
        Err(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(s: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        httlib_huffman::encode(s, &mut out).unwrap();
        out
    }

    #[test]
    fn decodes_what_an_independent_encoder_wrote() {
        // RFC 7541 C.4.1.
        let mut out = Vec::new();
        decode(
            &[
                0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90, 0xf4, 0xff,
            ],
            &mut out,
        )
        .unwrap();
        assert_eq!(out, b"www.example.com");
        // Every byte value, and strings of every length up to 64, from a
        // fixed pseudo-random sequence.
        let all: Vec<u8> = (0..=255).collect();
        let mut x = 0x9e37_79b9_u32;
        let mut cases = vec![all, Vec::new()];
        for len in 0..64 {
            cases.push(
                (0..len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 17;
                        x ^= x << 5;
                        x as u8
                    })
                    .collect(),
            );
        }
        cases.push(b"/api/v1/clicks?ad_id=ad-1&sig=AbC_-09".to_vec());
        for c in cases {
            let mut out = Vec::new();
            decode(&encode(&c), &mut out).unwrap();
            assert_eq!(out, c);
        }
    }

    #[test]
    fn refuses_eos_and_bad_padding() {
        let mut out = Vec::new();
        // 'a' (00011, 5 bits) then 3 zero bits: padding must be ones.
        assert!(decode(&[0b0001_1000], &mut out).is_err());
        // 'a' then 3 one-bits: fine.
        out.clear();
        decode(&[0b0001_1111], &mut out).unwrap();
        assert_eq!(out, b"a");
        // A whole byte of padding (8 one-bits) is too long.
        assert!(decode(&[0b0001_1111, 0xff], &mut Vec::new()).is_err());
        // EOS (30 one-bits) in the data.
        assert!(decode(&[0xff, 0xff, 0xff, 0xfc], &mut Vec::new()).is_err());
        // A code cut short: 'q' is 1110110 (7 bits); 111011 then the end.
        assert!(decode(&[0b1110_1100], &mut Vec::new()).is_err());
    }
}
