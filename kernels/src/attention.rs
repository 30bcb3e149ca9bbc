//! Attention of a prompt's queries over their keys, tiled.
//!
//! Keys are taken [`KEYS`] at a time: the tile is transposed once, scored
//! against one query row with `KEYS`-wide multiply-adds, turned into weights
//! with a vectorised `exp`, and its values are added into the row's output
//! with the online softmax's rescaling once per tile, not once per key. A
//! tile that the mask hides from a whole row (the future of a causal prompt,
//! the far past of a sliding window) is skipped for that row.
//!
//! Each row's result depends only on its own query, the keys, the values and
//! its mask row: tile boundaries are fixed multiples of `KEYS` from the first
//! key, and rows are never combined, so a query gets the same bits whichever
//! block of rows, batch or prompt length it arrives in.

use rayon::prelude::*;

/// Keys per tile.
pub const KEYS: usize = 64;
/// Query rows per parallel task (they share the task's transposed tiles).
const ROWS: usize = 16;
/// Values added per register block in the value update.
const VALUES: usize = 64;

/// A (batch, position, head, dim) f32 tensor whose last dimension is
/// contiguous: `data[b * batch + pos * position + h * head + i]`.
#[derive(Clone, Copy, Debug)]
pub struct Heads<'a> {
    pub data: &'a [f32],
    pub batch: usize,
    pub position: usize,
    pub head: usize,
}

impl<'a> Heads<'a> {
    #[inline(always)]
    fn row(&self, b: usize, pos: usize, h: usize, dim: usize) -> &'a [f32] {
        let start = b * self.batch + pos * self.position + h * self.head;
        &self.data[start..start + dim]
    }
}

/// The sizes and constants of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct PromptAttention {
    pub batch: usize,
    pub queries: usize,
    pub keys: usize,
    pub heads: usize,
    /// Heads of the keys and values; `heads` is a multiple of it (grouped
    /// queries share a key head).
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Multiplies the query-key products (usually `1/sqrt(head_dim)`).
    pub scale: f32,
    /// `c * tanh(score / c)` before the mask (Gemma 2's logit soft-capping).
    pub softcap: Option<f32>,
}

/// `softmax(q kᵀ · scale + mask) v` for every query row, into `out`, laid out
/// (batch, heads, queries, head_dim). `mask(b, h, query)` gives that row's
/// additive mask over the `keys` positions (`-inf` hides a key), or `None`
/// when the row sees every key. A row that sees no key at all gets zeros.
pub fn prompt_attention<'m, M>(p: &PromptAttention, q: Heads, k: Heads, v: Heads, mask: M, out: &mut [f32])
where
    M: Fn(usize, usize, usize) -> Option<&'m [f32]> + Sync,
{
    let d = p.head_dim;
    assert_eq!(out.len(), p.batch * p.heads * p.queries * d, "prompt_attention: output size");
    assert!(p.kv_heads > 0 && p.heads % p.kv_heads == 0, "prompt_attention: heads per key head");
    if out.is_empty() {
        return;
    }
    let group = p.heads / p.kv_heads;
    // The query carries the scale (and the soft cap's division) so that the
    // tile loop is one multiply-add per product.
    let q_scale = match p.softcap {
        Some(c) => p.scale / c,
        None => p.scale,
    };
    // Every key tile transposed once, shared by the heads of its group and
    // by every block of query rows.
    let tiles = p.keys.div_ceil(KEYS);
    let tile_len = d * KEYS;
    let mut key_tiles = vec![0f32; p.batch * p.kv_heads * tiles * tile_len];
    key_tiles.par_chunks_mut(tiles * tile_len).enumerate().for_each(|(bk, head_tiles)| {
        let (b, kvh) = (bk / p.kv_heads, bk % p.kv_heads);
        for (t, tile) in head_tiles.chunks_exact_mut(tile_len).enumerate() {
            let start = t * KEYS;
            transpose_keys(tile, KEYS.min(p.keys - start), |j| k.row(b, start + j, kvh, d));
        }
    });
    out.par_chunks_mut(p.queries * d).enumerate().for_each(|(bh, head_out)| {
        let (b, h) = (bh / p.heads, bh % p.heads);
        let kvh = h / group;
        head_out.par_chunks_mut(ROWS * d).enumerate().for_each(|(block, rows_out)| {
            let first = block * ROWS;
            let rows: Vec<Row> = (0..rows_out.len() / d)
                .map(|r| Row {
                    query: q.row(b, first + r, h, d).iter().map(|x| x * q_scale).collect(),
                    mask: mask(b, h, first + r),
                    max: f32::NEG_INFINITY,
                    sum: 0.0,
                })
                .collect();
            let head_tiles = &key_tiles[(b * p.kv_heads + kvh) * tiles * tile_len..][..tiles * tile_len];
            attend_rows(p, rows, |t| &head_tiles[t * tile_len..][..tile_len], |j| v.row(b, j, kvh, d), rows_out);
        });
    });
}

/// One query row's state through the tiles.
struct Row<'m> {
    query: Vec<f32>,
    mask: Option<&'m [f32]>,
    /// Largest score so far and the sum of `exp(score - max)`.
    max: f32,
    sum: f32,
}

impl Row<'_> {
    /// Whether any key of `start..start + n` is visible to this row.
    fn sees(&self, start: usize, n: usize) -> bool {
        match self.mask {
            None => true,
            // A fold rather than `any`: no early exit, so it vectorises.
            Some(m) => m[start..start + n].iter().fold(false, |seen, &x| seen | (x != f32::NEG_INFINITY)),
        }
    }
}

fn attend_rows<'a>(
    p: &PromptAttention,
    mut rows: Vec<Row>,
    key_tile: impl Fn(usize) -> &'a [f32],
    value: impl Fn(usize) -> &'a [f32],
    out: &mut [f32],
) {
    let d = p.head_dim;
    out.fill(0.0);
    let mut scores = [0f32; KEYS];
    for start in (0..p.keys).step_by(KEYS) {
        let n = KEYS.min(p.keys - start);
        let live: Vec<bool> = rows.iter().map(|r| r.sees(start, n)).collect();
        if !live.contains(&true) {
            continue;
        }
        let tile = key_tile(start / KEYS);
        for ((row, acc), _) in rows.iter_mut().zip(out.chunks_exact_mut(d)).zip(&live).filter(|(_, &l)| l) {
            score_tile(&row.query, tile, &mut scores);
            if let Some(c) = p.softcap {
                for s in &mut scores {
                    *s = c * s.tanh();
                }
            }
            if let Some(m) = row.mask {
                for (s, m) in scores.iter_mut().zip(&m[start..start + n]) {
                    *s += m;
                }
            }
            scores[n..].fill(f32::NEG_INFINITY);
            let tile_max = lanes(&scores, f32::NEG_INFINITY, f32::max).into_iter().fold(f32::NEG_INFINITY, f32::max);
            if tile_max == f32::NEG_INFINITY {
                continue;
            }
            let max = row.max.max(tile_max);
            let rescale = exp(row.max - max);
            for s in &mut scores {
                *s = exp(*s - max);
            }
            let [a, b, c, d, e, f, g, h] = lanes(&scores, 0.0, |x, y| x + y);
            let tile_sum = ((a + e) + (b + f)) + ((c + g) + (d + h));
            row.sum = row.sum * rescale + tile_sum;
            row.max = max;
            if rescale != 1.0 {
                for a in acc.iter_mut() {
                    *a *= rescale;
                }
            }
            add_values(acc, &scores[..n], |j| value(start + j));
        }
    }
    for (row, acc) in rows.iter().zip(out.chunks_exact_mut(d)) {
        let inv = if row.sum > 0.0 { 1.0 / row.sum } else { 0.0 };
        for a in acc {
            *a *= inv;
        }
    }
}

/// `op` folded over `KEYS` values in eight independent lanes: a float
/// reduction in one running value is a chain the compiler may not reorder,
/// and would stay scalar.
#[inline(always)]
fn lanes(values: &[f32; KEYS], init: f32, op: impl Fn(f32, f32) -> f32) -> [f32; 8] {
    let mut acc = [init; 8];
    for chunk in values.chunks_exact(8) {
        for l in 0..8 {
            acc[l] = op(acc[l], chunk[l]);
        }
    }
    acc
}

/// Keys `0..n` of a tile into `tile` transposed (`tile[i * KEYS + j]` is
/// dimension i of key j); the columns past `n` stay zero (their scores are
/// masked afterwards).
fn transpose_keys<'a>(tile: &mut [f32], n: usize, key: impl Fn(usize) -> &'a [f32]) {
    for j in 0..n {
        for (i, &x) in key(j).iter().enumerate() {
            tile[i * KEYS + j] = x;
        }
    }
}

/// `scores[j] = Σ_i query[i] · tile[i][j]`: one broadcast of each query value
/// against `KEYS` keys at once, accumulated in registers.
#[inline]
fn score_tile(query: &[f32], tile: &[f32], scores: &mut [f32; KEYS]) {
    let mut acc = [0f32; KEYS];
    for (&qi, keys) in query.iter().zip(tile.chunks_exact(KEYS)) {
        let keys: &[f32; KEYS] = keys.try_into().expect("tile rows are KEYS long");
        for j in 0..KEYS {
            acc[j] = fmadd(qi, keys[j], acc[j]);
        }
    }
    *scores = acc;
}

/// `acc += Σ_j weights[j] · value(j)`, `VALUES` output values at a time so
/// that they stay in registers across the keys.
#[inline]
fn add_values<'a>(acc: &mut [f32], weights: &[f32], value: impl Fn(usize) -> &'a [f32]) {
    let d = acc.len();
    let mut c0 = 0;
    while c0 + VALUES <= d {
        let mut block = [0f32; VALUES];
        block.copy_from_slice(&acc[c0..c0 + VALUES]);
        for (j, &w) in weights.iter().enumerate() {
            if w == 0.0 {
                continue;
            }
            let v: &[f32; VALUES] = value(j)[c0..c0 + VALUES].try_into().expect("VALUES values");
            for t in 0..VALUES {
                block[t] = fmadd(w, v[t], block[t]);
            }
        }
        acc[c0..c0 + VALUES].copy_from_slice(&block);
        c0 += VALUES;
    }
    if c0 < d {
        for (j, &w) in weights.iter().enumerate() {
            for (a, &x) in acc[c0..].iter_mut().zip(&value(j)[c0..]) {
                *a = fmadd(w, x, *a);
            }
        }
    }
}

/// `a * b + c`, one instruction where the target has FMA; without it
/// `mul_add` would be a library call per element.
#[inline(always)]
fn fmadd(a: f32, b: f32, c: f32) -> f32 {
    #[cfg(target_feature = "fma")]
    {
        a.mul_add(b, c)
    }
    #[cfg(not(target_feature = "fma"))]
    {
        a * b + c
    }
}

/// `e^x` in branch-free f32 arithmetic that the compiler vectorises (the
/// standard library's is a call per element): `x = n·ln 2 + r` with
/// `|r| ≤ ln 2 / 2`, `e^r` by Cephes' degree-7 polynomial, `2^n` written into
/// the exponent bits. Relative error below 2e-7 on the range softmax uses;
/// `e^x` for `x` below -87.3 (including -inf) is 0.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOW: f32 = -87.336_54;
    const HIGH: f32 = 88.0;
    let xc = x.clamp(LOW, HIGH);
    let n = fmadd(xc, std::f32::consts::LOG2_E, 0.5).floor();
    // ln 2 in two parts, so that n · ln 2 is subtracted without rounding.
    let r = fmadd(n, 2.121_944_4e-4, fmadd(n, -0.693_359_4, xc));
    let mut poly = 1.987_569_1e-4;
    for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
        poly = fmadd(poly, r, c);
    }
    let er = fmadd(poly, r * r, r + 1.0);
    let two_n = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x < LOW {
        0.0
    } else {
        er * two_n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    #[test]
    fn exp_is_within_two_ulp_of_the_true_value() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 10.0 {
            let got = exp(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 2.5e-7, "worst relative error {worst}");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(0.0), 1.0);
    }

    struct Case {
        p: PromptAttention,
        q: Vec<f32>,
        k: Vec<f32>,
        v: Vec<f32>,
        /// (batch, queries, keys) additive masks, shared by the heads.
        mask: Option<Vec<f32>>,
    }

    impl Case {
        fn new(p: PromptAttention, window: Option<usize>, causal: bool, seed: u64) -> Case {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut random = |n: usize| (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect::<Vec<_>>();
            let q = random(p.batch * p.queries * p.heads * p.head_dim);
            let k = random(p.batch * p.keys * p.kv_heads * p.head_dim);
            let v = random(p.batch * p.keys * p.kv_heads * p.head_dim);
            // Queries are the last `queries` positions (a prompt after a cached prefix).
            let offset = p.keys - p.queries;
            let mask = causal.then(|| {
                let mut m = vec![0f32; p.batch * p.queries * p.keys];
                for b in 0..p.batch {
                    for i in 0..p.queries {
                        for j in 0..p.keys {
                            let pos = offset + i;
                            let hidden = j > pos || window.is_some_and(|w| pos - j >= w);
                            if hidden {
                                m[(b * p.queries + i) * p.keys + j] = f32::NEG_INFINITY;
                            }
                        }
                    }
                }
                m
            });
            Case { p, q, k, v, mask }
        }

        fn heads<'a>(&self, data: &'a [f32], positions: usize, heads: usize) -> Heads<'a> {
            let d = self.p.head_dim;
            Heads { data, batch: positions * heads * d, position: heads * d, head: d }
        }

        fn run(&self) -> Vec<f32> {
            let p = &self.p;
            let mut out = vec![0f32; p.batch * p.heads * p.queries * p.head_dim];
            let mask = |b: usize, _h: usize, i: usize| {
                self.mask.as_ref().map(|m| &m[(b * p.queries + i) * p.keys..][..p.keys])
            };
            prompt_attention(
                p,
                self.heads(&self.q, p.queries, p.heads),
                self.heads(&self.k, p.keys, p.kv_heads),
                self.heads(&self.v, p.keys, p.kv_heads),
                mask,
                &mut out,
            );
            out
        }

        /// The definition, in f64.
        fn reference(&self) -> Vec<f64> {
            let p = &self.p;
            let d = p.head_dim;
            let mut out = vec![0f64; p.batch * p.heads * p.queries * d];
            for b in 0..p.batch {
                for h in 0..p.heads {
                    let kvh = h / (p.heads / p.kv_heads);
                    for i in 0..p.queries {
                        let qrow = &self.q[((b * p.queries + i) * p.heads + h) * d..][..d];
                        let mut scores: Vec<f64> = (0..p.keys)
                            .map(|j| {
                                let krow = &self.k[((b * p.keys + j) * p.kv_heads + kvh) * d..][..d];
                                let dot: f64 = qrow.iter().zip(krow).map(|(&a, &b)| a as f64 * b as f64).sum();
                                let mut s = dot * p.scale as f64;
                                if let Some(c) = p.softcap {
                                    s = c as f64 * (s / c as f64).tanh();
                                }
                                s + self.mask.as_ref().map_or(0.0, |m| m[(b * p.queries + i) * p.keys + j] as f64)
                            })
                            .collect();
                        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                        if max == f64::NEG_INFINITY {
                            continue;
                        }
                        let mut sum = 0.0;
                        for s in &mut scores {
                            *s = (*s - max).exp();
                            sum += *s;
                        }
                        let o = &mut out[((b * p.heads + h) * p.queries + i) * d..][..d];
                        for (j, w) in scores.iter().enumerate() {
                            let vrow = &self.v[((b * p.keys + j) * p.kv_heads + kvh) * d..][..d];
                            for (o, &x) in o.iter_mut().zip(vrow) {
                                *o += w / sum * x as f64;
                            }
                        }
                    }
                }
            }
            out
        }
    }

    fn shape(batch: usize, queries: usize, keys: usize, heads: usize, kv_heads: usize, head_dim: usize) -> PromptAttention {
        PromptAttention {
            batch,
            queries,
            keys,
            heads,
            kv_heads,
            head_dim,
            scale: 1.0 / (head_dim as f32).sqrt(),
            softcap: None,
        }
    }

    #[test]
    fn matches_the_definition() {
        let cases = [
            // (shape, sliding window, causal)
            (shape(1, 150, 150, 4, 2, 64), None, true),
            (shape(2, 37, 200, 3, 1, 256), None, true),
            (shape(1, 70, 70, 2, 2, 80), Some(20), true),
            (shape(1, 9, 9, 2, 1, 64), None, false),
            (PromptAttention { softcap: Some(5.0), ..shape(1, 65, 65, 2, 1, 64) }, None, true),
        ];
        for (n, (p, window, causal)) in cases.into_iter().enumerate() {
            let case = Case::new(p, window, causal, n as u64);
            let got = case.run();
            let want = case.reference();
            for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                assert!((g as f64 - w).abs() < 2e-5 * (1.0 + w.abs()), "case {n}, value {i}: {g} vs {w}");
            }
        }
    }

    #[test]
    fn a_row_does_not_depend_on_the_rows_around_it() {
        // Every query of a causal prompt, computed with all the others and
        // alone (a one-row call over the same keys with its mask row).
        let p = shape(1, 100, 100, 2, 1, 64);
        let case = Case::new(p, None, true, 7);
        let all = case.run();
        let d = p.head_dim;
        for i in [0, 15, 16, 63, 64, 99] {
            let lone = Case {
                p: PromptAttention { queries: 1, ..p },
                q: case.q[i * p.heads * d..(i + 1) * p.heads * d].to_vec(),
                k: case.k.clone(),
                v: case.v.clone(),
                mask: case.mask.as_ref().map(|m| m[i * p.keys..(i + 1) * p.keys].to_vec()),
            };
            let one = lone.run();
            for h in 0..p.heads {
                let row = &all[(h * p.queries + i) * d..][..d];
                assert_eq!(row, &one[h * d..(h + 1) * d], "query {i}, head {h}");
            }
        }
    }

    #[test]
    fn a_row_that_sees_nothing_is_zero() {
        let p = shape(1, 2, 3, 1, 1, 64);
        let mut case = Case::new(p, None, false, 3);
        case.mask = Some(vec![f32::NEG_INFINITY; 6]);
        assert!(case.run().iter().all(|&x| x == 0.0));
    }
}
