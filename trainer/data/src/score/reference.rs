//! Agreement with a reference answer, the instruction signal that needs no
//! judge model: how much of a response's wording a reference response (the
//! AlpacaEval GPT-4 answer, an Alpaca `output`, a dataset's chosen response)
//! shares, as the mean of the unigram and bigram F1 over lowercased words
//! (ROUGE-1 and ROUGE-2 F-measures, without stemming).
//!
//! What it measures: whether a response addresses the instruction the way
//! the reference does, by its words. It tells an answer to the question
//! from an answer to another question (`bench/reference_check.py` measures
//! how often), which the judges this machine can run cannot; it does not
//! see correctness beyond wording, and it favours responses shaped like the
//! reference. A reward model or a judge that passes `bench/judge_check.py`
//! ranks better where one is available: pairing uses this only where
//! neither scored.

use std::collections::HashMap;

/// Lowercased words: runs of letters and digits.
fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

fn counts<T: std::hash::Hash + Eq>(items: impl Iterator<Item = T>) -> HashMap<T, usize> {
    let mut m = HashMap::new();
    for x in items {
        *m.entry(x).or_insert(0) += 1;
    }
    m
}

/// F1 of two multisets (clipped overlap); 0 when either is empty.
fn f1<T: std::hash::Hash + Eq>(a: &HashMap<T, usize>, b: &HashMap<T, usize>) -> f64 {
    let (na, nb): (usize, usize) = (a.values().sum(), b.values().sum());
    if na == 0 || nb == 0 {
        return 0.0;
    }
    let overlap: usize = a
        .iter()
        .map(|(k, n)| (*n).min(*b.get(k).unwrap_or(&0)))
        .sum();
    if overlap == 0 {
        return 0.0;
    }
    let (p, r) = (overlap as f64 / na as f64, overlap as f64 / nb as f64);
    2.0 * p * r / (p + r)
}

/// The agreement of `response` with `reference`, in [0, 1].
pub fn agreement(response: &str, reference: &str) -> f64 {
    let (a, b) = (words(response), words(reference));
    let uni = f1(&counts(a.iter()), &counts(b.iter()));
    let bi = f1(&counts(a.windows(2)), &counts(b.windows(2)));
    (uni + bi) / 2.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_disjoint_and_partial() {
        let r = "Paris is the capital of France.";
        assert!((agreement(r, r) - 1.0).abs() < 1e-12);
        assert_eq!(agreement("Bananas are yellow.", r), 0.0);
        assert_eq!(agreement("", r), 0.0);
        let close = agreement("The capital of France is Paris.", r);
        let far = agreement("France is a country in Europe.", r);
        assert!(close > far && far > 0.0, "{close} {far}");
        // Case and punctuation do not count.
        assert!((agreement("PARIS, is the capital of france", r) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn an_answer_to_the_question_beats_one_to_another_question() {
        let reference = "To boil an egg, place it in boiling water for about nine minutes, then cool it in cold water before peeling.";
        let answer = "Put the egg in a pot of boiling water, leave it for 8 to 10 minutes, then move it to cold water and peel it.";
        let other = "The French Revolution began in 1789 and ended the monarchy; it spread ideas of liberty across Europe.";
        assert!(agreement(answer, reference) > 2.0 * agreement(other, reference));
    }
}
