//! Examples to tensors: the rows packed end to end with no padding (each
//! row's tokens but its last, the model attends within each row only), the
//! learned positions as indices into the packed tokens with their targets
//! (only they reach the vocabulary projection), and which row each belongs to.

use candle_core::{Device, Tensor};

use crate::chat::Encoded;
use crate::error::{Result, TrainError};

pub struct Batch {
    /// (tokens,) u32: tokens 0..n-1 of each row, row after row.
    pub inputs: Tensor,
    /// Length of each row in `inputs` (its tokens minus one).
    pub lens: Vec<usize>,
    /// (n,) u32: the learned positions, as indices into `inputs`.
    pub learned_positions: Tensor,
    /// (n,) u32: the target token at each learned position.
    pub learned_targets: Tensor,
    /// (rows, n) f32: 1 where learned position j belongs to row r (sums per row by matmul).
    pub membership: Tensor,
    /// Learned targets per row.
    pub learned: Vec<usize>,
    /// Real tokens in the batch (every row's full length).
    pub tokens: usize,
}

impl Batch {
    pub fn new(rows: &[&Encoded], device: &Device) -> Result<Self> {
        let lens: Vec<usize> = rows.iter().map(|r| r.ids.len().saturating_sub(1)).collect();
        if let Some(r) = lens.iter().position(|&n| n == 0) {
            return Err(TrainError::Config(format!(
                "row {r} of a batch has {} token(s): a training row needs a prompt and at \
                 least one learned token",
                rows[r].ids.len()
            )));
        }
        let mut inputs = Vec::with_capacity(lens.iter().sum());
        let mut learned = Vec::with_capacity(rows.len());
        let mut positions: Vec<u32> = Vec::new();
        let mut position_targets: Vec<u32> = Vec::new();
        let mut owner: Vec<usize> = Vec::new();
        let mut tokens = 0;
        for (r, (row, &n)) in rows.iter().zip(&lens).enumerate() {
            tokens += row.ids.len();
            let base = inputs.len();
            inputs.extend_from_slice(&row.ids[..n]);
            let mut count = 0;
            for i in 0..n {
                if row.learn[i + 1] {
                    count += 1;
                    positions.push((base + i) as u32);
                    position_targets.push(row.ids[i + 1]);
                    owner.push(r);
                }
            }
            learned.push(count);
        }
        let n = positions.len();
        let mut membership = vec![0f32; rows.len() * n];
        for (j, &r) in owner.iter().enumerate() {
            membership[r * n + j] = 1.0;
        }
        let total = inputs.len();
        Ok(Self {
            learned_positions: Tensor::from_vec(positions, n, device)?,
            learned_targets: Tensor::from_vec(position_targets, n, device)?,
            membership: Tensor::from_vec(membership, (rows.len(), n), device)?,
            inputs: Tensor::from_vec(inputs, total, device)?,
            lens,
            learned,
            tokens,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_rows_and_indexes_learned_positions() {
        let a = Encoded {
            ids: vec![1, 2, 3, 4],
            learn: vec![false, false, true, true],
        };
        let b = Encoded {
            ids: vec![5, 6],
            learn: vec![false, true],
        };
        let batch = Batch::new(&[&a, &b], &Device::Cpu).unwrap();
        assert_eq!(batch.inputs.to_vec1::<u32>().unwrap(), vec![1, 2, 3, 5]);
        assert_eq!(batch.lens, vec![3, 1]);
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
        let lone = Encoded {
            ids: vec![7],
            learn: vec![true],
        };
        assert!(Batch::new(&[&a, &lone], &Device::Cpu).is_err());
    }
}
