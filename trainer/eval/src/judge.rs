//! The pairwise judge of the instruction win rate: the judge sees the
//! instruction, the model's output and AlpacaEval's GPT-4 reference output,
//! and says which is better. Every prompt is judged in both orders (model
//! first, then reference first) to cancel position bias; a win counts 1, a
//! tie 0.5, a loss 0, and a prompt's score is the mean of its two orders. A
//! judge reply without a readable verdict is recorded as a failure and the
//! prompt is left out of the win rate (never counted as a win).

use std::sync::OnceLock;

use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

pub const SYSTEM: &str = "You are a fair and impartial judge. You compare two outputs written by AI assistants for the same instruction and decide which one follows the instruction better: more helpful, more correct, clearer. Do not let the order of the outputs or their length influence you.";

/// The judge's verdict in one order, about the outputs as shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    A,
    B,
    Tie,
}

/// Which output is shown first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Order {
    /// Output (a) is the model's, (b) the reference.
    ModelFirst,
    /// Output (a) is the reference, (b) the model's.
    ReferenceFirst,
}

impl Order {
    pub const BOTH: [Order; 2] = [Order::ModelFirst, Order::ReferenceFirst];
    pub fn as_str(self) -> &'static str {
        match self {
            Order::ModelFirst => "model_first",
            Order::ReferenceFirst => "reference_first",
        }
    }
}

/// The model's score for one order: win 1, tie 0.5, loss 0.
pub fn model_score(order: Order, v: Verdict) -> f64 {
    match (order, v) {
        (_, Verdict::Tie) => 0.5,
        (Order::ModelFirst, Verdict::A) | (Order::ReferenceFirst, Verdict::B) => 1.0,
        _ => 0.0,
    }
}

/// A prompt's score from its two orders; `None` when either order has no
/// verdict (the judge failed), so a failure never counts as a win.
pub fn prompt_score(model_first: Option<Verdict>, reference_first: Option<Verdict>) -> Option<f64> {
    Some(
        (model_score(Order::ModelFirst, model_first?)
            + model_score(Order::ReferenceFirst, reference_first?))
            / 2.0,
    )
}

/// The judge's user message.
pub fn user_message(instruction: &str, a: &str, b: &str) -> String {
    format!(
        "Which output follows the instruction better?\n\n## Instruction\n{instruction}\n\n## Output (a)\n{a}\n\n## Output (b)\n{b}\n\n## Your verdict\nReply with exactly one of: \"A\" if output (a) is better, \"B\" if output (b) is better, or \"tie\". Verdict:"
    )
}

/// The judge request for one prompt and order.
pub fn request(
    model: &str,
    max_tokens: u64,
    instruction: &str,
    response: &str,
    reference: &str,
    order: Order,
) -> Value {
    let (a, b) = match order {
        Order::ModelFirst => (response, reference),
        Order::ReferenceFirst => (reference, response),
    };
    json!({
        "model": model,
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": user_message(instruction, a, b)},
        ],
        "max_tokens": max_tokens,
        "temperature": 0.0,
    })
}

fn letter(s: &str) -> Option<Verdict> {
    match s.to_ascii_lowercase().as_str() {
        "a" => Some(Verdict::A),
        "b" => Some(Verdict::B),
        "c" | "tie" | "draw" | "equal" | "both" | "neither" => Some(Verdict::Tie),
        _ => None,
    }
}

/// The verdict in a judge's reply, read robustly: `[[A]]`-style marks, a
/// leading `A` / `B` / `tie` (after "Verdict:" and the like), "Output (b)
/// is better", "it's a tie". `None` when there is none or it is ambiguous.
pub fn parse_verdict(text: &str) -> Option<Verdict> {
    static R: OnceLock<[Regex; 4]> = OnceLock::new();
    let [brackets, leading, better, tie] = R.get_or_init(|| {
        [
            Regex::new(r"(?i)\[\[\s*(a|b|c|tie)\s*\]\]").unwrap(),
            Regex::new(
                r#"(?ix)^[\s*"'`\#>]*
                (?:(?:final\s+)?(?:verdict|answer|winner|better(?:\s+output)?|choice|preferred(?:\s+output)?)\s*(?:is)?\s*[:=\-]?\s*[*"'`]*\s*)?
                (?:
                   (?:output|response|assistant)\s*\(?\s*(?P<l1>[ab])\s*\)? (?:$|[^a-z0-9])
                 | \(\s*(?P<l2>[ab])\s*\) (?:$|[^a-z0-9])
                 | (?-i:(?P<l3>[AB])) (?:\s*$ | \s*[\n(.)\]:,;!*"'`] | \s+(?:is|was|because|output|response)\b)
                 | (?P<t>tie|draw|equal|both\s+are\s+equal)\b
                )"#,
            )
            .unwrap(),
            Regex::new(
                r"(?i)\b(?:output|response|assistant|answer)\s*\(?\s*([ab])\s*\)?\s*(?:is|was|seems|appears)\s+(?:clearly\s+|slightly\s+|much\s+)?(?:the\s+)?(?:better|preferred|superior|more\s+helpful|stronger)",
            )
            .unwrap(),
            Regex::new(r"(?i)\b(?:it'?s\s+a\s+tie|is\s+a\s+tie|a\s+tie\b|equally\s+(?:good|bad|helpful)|both\s+(?:outputs\s+|responses\s+)?are\s+equally)").unwrap(),
        ]
    });
    if let Some(c) = brackets.captures(text) {
        return letter(&c[1]);
    }
    let letters: std::collections::BTreeSet<String> = better
        .captures_iter(text)
        .map(|c| c[1].to_ascii_lowercase())
        .collect();
    if letters.len() > 1 {
        return None; // "Output (a) is better ... output (b) is better"
    }
    if let Some(c) = leading.captures(text.trim_start()) {
        for g in ["l1", "l2", "l3", "t"] {
            if let Some(m) = c.name(g) {
                let s = m.as_str();
                return letter(if g == "t" { "tie" } else { s });
            }
        }
    }
    if letters.len() == 1 {
        return letter(letters.iter().next().unwrap());
    }
    if letters.is_empty() && tie.is_match(text) {
        return Some(Verdict::Tie);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use Verdict::*;

    #[test]
    fn verdicts_in_many_shapes() {
        let cases: &[(&str, Option<Verdict>)] = &[
            ("A", Some(A)),
            ("B", Some(B)),
            ("tie", Some(Tie)),
            ("Tie.", Some(Tie)),
            (" B\n\nOutput (b) explains more.", Some(B)),
            ("A. Output (a) is correct.", Some(A)),
            ("**B**", Some(B)),
            ("\"A\"", Some(A)),
            ("Verdict: B", Some(B)),
            ("Final verdict: [[A]]", Some(A)),
            ("[[C]]", Some(Tie)),
            ("Output (b)", Some(B)),
            ("(a)", Some(A)),
            ("Output (a) is better because it is correct.", Some(A)),
            ("I think output (b) is clearly better.", Some(B)),
            ("Both are equally good.", Some(Tie)),
            ("It's a tie.", Some(Tie)),
            ("B is better", Some(B)),
            // Not verdicts.
            ("A good answer would mention Paris.", None),
            ("", None),
            ("I cannot decide.", None),
            ("Output (a) is better. Output (b) is better.", None),
            ("Both outputs talk about cats", None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_verdict(text), *want, "{text:?}");
        }
    }

    #[test]
    fn both_orders_cancel_position_bias() {
        // A judge that always says "A" gives every model exactly 0.5.
        assert_eq!(prompt_score(Some(A), Some(A)), Some(0.5));
        assert_eq!(prompt_score(Some(B), Some(B)), Some(0.5));
        // A consistent preference for the model in both orders: a win.
        assert_eq!(prompt_score(Some(A), Some(B)), Some(1.0));
        // For the reference in both orders: a loss.
        assert_eq!(prompt_score(Some(B), Some(A)), Some(0.0));
        // Ties and mixed.
        assert_eq!(prompt_score(Some(Tie), Some(Tie)), Some(0.5));
        assert_eq!(prompt_score(Some(A), Some(Tie)), Some(0.75));
        assert_eq!(prompt_score(Some(Tie), Some(A)), Some(0.25));
        // A failed order is no win: the prompt is left out.
        assert_eq!(prompt_score(None, Some(B)), None);
        assert_eq!(prompt_score(Some(A), None), None);
    }

    #[test]
    fn request_places_the_outputs_by_order() {
        let r = request("j", 16, "Say hi", "MODEL", "REF", Order::ModelFirst);
        let u = r["messages"][1]["content"].as_str().unwrap();
        assert!(u.find("MODEL").unwrap() < u.find("REF").unwrap());
        assert_eq!(r["temperature"], 0.0);
        let r = request("j", 16, "Say hi", "MODEL", "REF", Order::ReferenceFirst);
        let u = r["messages"][1]["content"].as_str().unwrap();
        assert!(u.find("REF").unwrap() < u.find("MODEL").unwrap());
    }
}
