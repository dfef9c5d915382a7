//! Partitioning strategies: which contiguous blocks each node holds.

use std::ops::Range;

use crate::error::{Error, Result};

/// The design doc's `even` strategy: blocks split as evenly as possible, the
/// first nodes taking one more when it does not divide (80 over 3 nodes:
/// 0-26, 27-53, 54-79).
pub fn even(n_layers: usize, n_nodes: usize) -> Result<Vec<Range<usize>>> {
    if n_nodes == 0 {
        return Err(Error::InvalidRequest("a plan needs at least one node".into()));
    }
    if n_nodes > n_layers {
        return Err(Error::InvalidRequest(format!("{n_nodes} nodes cannot share {n_layers} blocks: each needs at least one")));
    }
    let (base, extra) = (n_layers / n_nodes, n_layers % n_nodes);
    let mut start = 0;
    Ok((0..n_nodes)
        .map(|i| {
            let len = base + usize::from(i < extra);
            let r = start..start + len;
            start += len;
            r
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn even_matches_the_design_doc() {
        assert_eq!(even(80, 2).unwrap(), vec![0..40, 40..80]);
        assert_eq!(even(80, 3).unwrap(), vec![0..27, 27..54, 54..80]);
        assert_eq!(even(30, 1).unwrap(), vec![0..30]);
    }

    #[test]
    fn even_covers_every_layer_once() {
        for layers in 1..40 {
            for nodes in 1..=layers {
                let plan = even(layers, nodes).unwrap();
                assert_eq!(plan.len(), nodes);
                assert_eq!(plan[0].start, 0);
                assert_eq!(plan.last().unwrap().end, layers);
                assert!(plan.windows(2).all(|w| w[0].end == w[1].start && !w[0].is_empty()));
                let (min, max) = (plan.iter().map(|r| r.len()).min().unwrap(), plan.iter().map(|r| r.len()).max().unwrap());
                assert!(max - min <= 1);
            }
        }
        assert!(even(2, 3).is_err());
        assert!(even(2, 0).is_err());
    }
}
