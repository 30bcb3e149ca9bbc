//! The pairwise judge of the instruction win rate: the judge sees the
//! instruction, the model's output and AlpacaEval's GPT-4 reference output,
//! and says which is better. Every prompt is judged in both orders (model
//! first, then reference first) to cancel position bias, and a prompt's
//! score is the mean of its two orders.
//!
//! An order scores 1 for a win, 0.5 for a tie and 0 for a loss, or, with
//! [`Scoring::Weighted`] (the default, as AlpacaEval 2.0's weighted
//! annotators do) and a judge that returns `top_logprobs`, the probability
//! the judge gave the model's letter at the verdict token (a tie's counts
//! half). A small judge that nearly always answers "A" gives every model
//! exactly 0.5 by verdicts; its probabilities still say how much it leans
//! toward each output. A judge reply without a readable verdict is recorded
//! as a failure and the prompt is left out of the win rate (never counted as
//! a win).

use std::sync::OnceLock;

use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

pub const SYSTEM: &str = "You are a fair and impartial judge. You compare two outputs written by AI assistants for the same instruction and decide which one follows the instruction better: more helpful, more correct, clearer. Do not let the order of the outputs or their length influence you.";

/// How many alternatives a weighted judge request asks for at each token
/// (OpenAI allows up to 20).
pub const TOP_LOGPROBS: u64 = 10;

/// The judge's verdict in one order, about the outputs as shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    A,
    B,
    Tie,
}

/// How a judged order becomes a score.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scoring {
    /// The judge's probabilities of its verdict tokens (asks for
    /// `logprobs`); the verdict alone where the judge returns none.
    #[default]
    Weighted,
    /// The verdict alone: win 1, tie 0.5, loss 0.
    Verdict,
}

/// The judge's probabilities of "A", "B" and "tie" at its verdict token,
/// normalised over the three.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct VerdictProbs {
    pub a: f64,
    pub b: f64,
    pub tie: f64,
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

/// The model's score for one judged order: the probability of its letter
/// (a tie's half) when the judge's probabilities are there, else the
/// verdict's score; `None` without a verdict (the judge failed).
pub fn order_score(order: Order, verdict: Option<Verdict>, probs: Option<VerdictProbs>) -> Option<f64> {
    let verdict = verdict?;
    Some(match probs {
        Some(p) => {
            let mine = match order {
                Order::ModelFirst => p.a,
                Order::ReferenceFirst => p.b,
            };
            mine + 0.5 * p.tie
        }
        None => model_score(order, verdict),
    })
}

/// A prompt's score from its two orders' scores; `None` when either order
/// has none (the judge failed), so a failure never counts as a win.
pub fn prompt_score(model_first: Option<f64>, reference_first: Option<f64>) -> Option<f64> {
    Some((model_first? + reference_first?) / 2.0)
}

/// The verdict a single generated token stands for: "A", " b", "(a",
/// "[[B", "tie"; `None` for anything else.
fn verdict_token(token: &str) -> Option<Verdict> {
    let t = token.trim_matches(|c: char| !c.is_alphanumeric());
    match t {
        "A" | "a" => Some(Verdict::A),
        "B" | "b" => Some(Verdict::B),
        "tie" | "Tie" | "TIE" => Some(Verdict::Tie),
        _ => None,
    }
}

/// The judge's probabilities at its verdict: the first generated token
/// that stands for `verdict` (the verdict read from the whole reply), and
/// the "A", "B" and "tie" tokens among that position's `top_logprobs`
/// (OpenAI's `choices[0].logprobs.content`). `None` when the response has
/// no logprobs or no such token.
pub fn verdict_probs(raw: &Value, verdict: Verdict) -> Option<VerdictProbs> {
    let content = raw["choices"][0]["logprobs"]["content"].as_array()?;
    let at = content
        .iter()
        .find(|t| t["token"].as_str().and_then(verdict_token) == Some(verdict))?;
    let mut p = VerdictProbs { a: 0.0, b: 0.0, tie: 0.0 };
    let top = at["top_logprobs"].as_array()?;
    for alt in top {
        let (Some(tok), Some(lp)) = (alt["token"].as_str(), alt["logprob"].as_f64()) else {
            continue;
        };
        let prob = lp.exp();
        if !prob.is_finite() {
            continue;
        }
        match verdict_token(tok) {
            Some(Verdict::A) => p.a += prob,
            Some(Verdict::B) => p.b += prob,
            Some(Verdict::Tie) => p.tie += prob,
            None => {}
        }
    }
    let total = p.a + p.b + p.tie;
    (total > 0.0).then(|| VerdictProbs { a: p.a / total, b: p.b / total, tie: p.tie / total })
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
    scoring: Scoring,
    instruction: &str,
    response: &str,
    reference: &str,
    order: Order,
) -> Value {
    let (a, b) = match order {
        Order::ModelFirst => (response, reference),
        Order::ReferenceFirst => (reference, response),
    };
    let mut body = json!({
        "model": model,
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": user_message(instruction, a, b)},
        ],
        "max_tokens": max_tokens,
        "temperature": 0.0,
    });
    if scoring == Scoring::Weighted {
        body["logprobs"] = json!(true);
        body["top_logprobs"] = json!(TOP_LOGPROBS);
    }
    body
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

    fn by_verdicts(mf: Option<Verdict>, rf: Option<Verdict>) -> Option<f64> {
        prompt_score(order_score(Order::ModelFirst, mf, None), order_score(Order::ReferenceFirst, rf, None))
    }

    #[test]
    fn both_orders_cancel_position_bias() {
        // A judge that always says "A" gives every model exactly 0.5.
        assert_eq!(by_verdicts(Some(A), Some(A)), Some(0.5));
        assert_eq!(by_verdicts(Some(B), Some(B)), Some(0.5));
        // A consistent preference for the model in both orders: a win.
        assert_eq!(by_verdicts(Some(A), Some(B)), Some(1.0));
        // For the reference in both orders: a loss.
        assert_eq!(by_verdicts(Some(B), Some(A)), Some(0.0));
        // Ties and mixed.
        assert_eq!(by_verdicts(Some(Tie), Some(Tie)), Some(0.5));
        assert_eq!(by_verdicts(Some(A), Some(Tie)), Some(0.75));
        assert_eq!(by_verdicts(Some(Tie), Some(A)), Some(0.25));
        // A failed order is no win: the prompt is left out.
        assert_eq!(by_verdicts(None, Some(B)), None);
        assert_eq!(by_verdicts(Some(A), None), None);
    }

    fn logprobs_reply(tokens: &[(&str, &[(&str, f64)])]) -> Value {
        let content: Vec<Value> = tokens
            .iter()
            .map(|(tok, top)| {
                let top: Vec<Value> = top
                    .iter()
                    .map(|(t, p)| json!({"token": t, "logprob": p.ln()}))
                    .collect();
                json!({"token": tok, "logprob": 0.0, "top_logprobs": top})
            })
            .collect();
        json!({"choices": [{"message": {"content": ""}, "logprobs": {"content": content}}]})
    }

    #[test]
    fn weighted_scores_keep_the_lean_a_biased_judge_hides() {
        // Always "A", but surer when (a) really is better.
        let sure = logprobs_reply(&[("A", &[("A", 0.8), ("B", 0.2)])]);
        let unsure = logprobs_reply(&[("A", &[("A", 0.55), (" B", 0.4), ("C", 0.05)])]);
        let p_sure = verdict_probs(&sure, A).unwrap();
        let p_unsure = verdict_probs(&unsure, A).unwrap();
        assert!((p_sure.a - 0.8).abs() < 1e-9 && (p_sure.b - 0.2).abs() < 1e-9);
        // "C" is no verdict token: normalised over A and B.
        assert!((p_unsure.b - 0.4 / 0.95).abs() < 1e-9, "{p_unsure:?}");
        // The model's output first and better, then second and still better.
        let s = prompt_score(
            order_score(Order::ModelFirst, Some(A), Some(p_sure)),
            order_score(Order::ReferenceFirst, Some(A), Some(p_unsure)),
        )
        .unwrap();
        assert!((s - (0.8 + 0.4 / 0.95) / 2.0).abs() < 1e-9);
        assert!(s > 0.5, "by verdicts alone this is exactly 0.5");
        // A tie's probability counts half.
        let t = logprobs_reply(&[("tie", &[("tie", 0.5), ("A", 0.25), ("B", 0.25)])]);
        let pt = verdict_probs(&t, Tie).unwrap();
        assert_eq!(order_score(Order::ReferenceFirst, Some(Tie), Some(pt)), Some(0.5));
    }

    #[test]
    fn the_verdict_token_is_found_after_a_preamble() {
        // "Output (b) is better": the position of "b" is the verdict.
        let r = logprobs_reply(&[
            ("Output", &[("Output", 0.9)]),
            (" (", &[(" (", 0.99)]),
            ("b", &[("b", 0.7), ("a", 0.3)]),
            (")", &[(")", 1.0)]),
        ]);
        let p = verdict_probs(&r, B).unwrap();
        assert!((p.b - 0.7).abs() < 1e-9 && (p.a - 0.3).abs() < 1e-9);
        // No logprobs (a judge that does not return them): no probabilities,
        // and the order scores by its verdict.
        let plain = json!({"choices": [{"message": {"content": "A"}}]});
        assert_eq!(verdict_probs(&plain, A), None);
        assert_eq!(order_score(Order::ModelFirst, Some(A), None), Some(1.0));
        // No token stands for the verdict read from the text.
        assert_eq!(verdict_probs(&r, A), None);
        // Words that merely start with a letter are not verdict tokens.
        assert_eq!(verdict_token("Answer"), None);
        assert_eq!(verdict_token(" (a"), Some(A));
        assert_eq!(verdict_token("[["), None);
    }

    #[test]
    fn request_places_the_outputs_by_order() {
        let r = request("j", 16, Scoring::Verdict, "Say hi", "MODEL", "REF", Order::ModelFirst);
        let u = r["messages"][1]["content"].as_str().unwrap();
        assert!(u.find("MODEL").unwrap() < u.find("REF").unwrap());
        assert_eq!(r["temperature"], 0.0);
        assert!(r.get("logprobs").is_none());
        let r = request("j", 16, Scoring::Weighted, "Say hi", "MODEL", "REF", Order::ReferenceFirst);
        assert_eq!((r["logprobs"].clone(), r["top_logprobs"].clone()), (json!(true), json!(TOP_LOGPROBS)));
        let u = r["messages"][1]["content"].as_str().unwrap();
        assert!(u.find("REF").unwrap() < u.find("MODEL").unwrap());
    }
}
