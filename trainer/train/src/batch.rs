//! Examples to tensors: right-padded rows of input ids, the next-token
//! targets, a 0/1 mask of the targets that are learned, and the same
//! learned positions as a list (so only they reach the vocabulary projection).

use candle_core::{Device, Tensor};

use crate::chat::Encoded;
use crate::error::Result;

pub struct Batch {
    /// (rows, len) u32: tokens 0..n-1 of each sequence, padded.
    pub inputs: Tensor,
    /// (rows, len) u32: tokens 1..n, the ones each position predicts.
    pub targets: Tensor,
    /// (rows, len) f32: 1 where the target is learned, 0 elsewhere and on padding.
    pub mask: Tensor,
    /// (n,) u32: the learned positions, as indices into the flattened (rows * len).
    pub learned_positions: Tensor,
    /// (n,) u32: the target token at each learned position.
    pub learned_targets: Tensor,
    /// (rows, n) f32: 1 where learned position j belongs to row r (sums per row by matmul).
    pub membership: Tensor,
    /// Learned targets per row.
    pub learned: Vec<usize>,
    /// Real (unpadded) tokens in the batch.
    pub tokens: usize,
}

impl Batch {
    pub fn new(rows: &[&Encoded], pad_id: u32, device: &Device) -> Result<Self> {
        let len = rows
            .iter()
            .map(|r| r.ids.len().saturating_sub(1))
            .max()
            .unwrap_or(0)
            .max(1);
        let mut inputs = vec![pad_id; rows.len() * len];
        let mut targets = vec![pad_id; rows.len() * len];
        let mut mask = vec![0f32; rows.len() * len];
        let mut learned = Vec::with_capacity(rows.len());
        let mut positions: Vec<u32> = Vec::new();
        let mut position_targets: Vec<u32> = Vec::new();
        let mut owner: Vec<usize> = Vec::new();
        let mut tokens = 0;
        for (r, row) in rows.iter().enumerate() {
            let n = row.ids.len().saturating_sub(1);
            tokens += row.ids.len();
            let base = r * len;
            inputs[base..base + n].copy_from_slice(&row.ids[..n]);
            targets[base..base + n].copy_from_slice(&row.ids[1..]);
            let mut count = 0;
            for i in 0..n {
                if row.learn[i + 1] {
                    mask[base + i] = 1.0;
                    count += 1;
                    positions.push((base + i) as u32);
                    position_targets.push(row.ids[i + 1]);
                    owner.push(r);
                }
            }
            learned.push(count);
        }
        let shape = (rows.len(), len);
        let n = positions.len();
        let mut membership = vec![0f32; rows.len() * n];
        for (j, &r) in owner.iter().enumerate() {
            membership[r * n + j] = 1.0;
        }
        Ok(Self {
            learned_positions: Tensor::from_vec(positions, n, device)?,
            learned_targets: Tensor::from_vec(position_targets, n, device)?,
            membership: Tensor::from_vec(membership, (rows.len(), n), device)?,
            inputs: Tensor::from_vec(inputs, shape, device)?,
            targets: Tensor::from_vec(targets, shape, device)?,
            mask: Tensor::from_vec(mask, shape, device)?,
            learned,
            tokens,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shifts_pads_and_masks() {
        let a = Encoded {
            ids: vec![1, 2, 3, 4],
            learn: vec![false, false, true, true],
        };
        let b = Encoded {
            ids: vec![5, 6],
            learn: vec![false, true],
        };
        let batch = Batch::new(&[&a, &b], 0, &Device::Cpu).unwrap();
        assert_eq!(
            batch.inputs.to_vec2::<u32>().unwrap(),
            vec![vec![1, 2, 3], vec![5, 0, 0]]
        );
        assert_eq!(
            batch.targets.to_vec2::<u32>().unwrap(),
            vec![vec![2, 3, 4], vec![6, 0, 0]]
        );
        assert_eq!(
            batch.mask.to_vec2::<f32>().unwrap(),
            vec![vec![0.0, 1.0, 1.0], vec![1.0, 0.0, 0.0]]
        );
        assert_eq!(batch.learned, vec![2, 1]);
        assert_eq!(
            batch.learned_positions.to_vec1::<u32>().unwrap(),
            vec![1, 2, 3]
        );
        assert_eq!(
            batch.learned_targets.to_vec1::<u32>().unwrap(),
            vec![3, 4, 6]
        );
        assert_eq!(
            batch.membership.to_vec2::<f32>().unwrap(),
            vec![vec![1.0, 1.0, 0.0], vec![0.0, 0.0, 1.0]]
        );
        assert_eq!(batch.tokens, 6);
    }
}
