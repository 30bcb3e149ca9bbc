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

/// One judged order: the verdict read from the reply, and the judge's
/// probabilities at it where it returned logprobs.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Judged {
    pub verdict: Option<Verdict>,
    pub probs: Option<VerdictProbs>,
}

/// The model's probability-weighted score for one order: the probability
/// of its letter, a tie's counting half.
fn weighted_score(order: Order, p: VerdictProbs) -> f64 {
    let mine = match order {
        Order::ModelFirst => p.a,
        Order::ReferenceFirst => p.b,
    };
    mine + 0.5 * p.tie
}

/// A prompt's score from its two orders (model first, reference first):
/// the mean of the orders' weighted scores when both have probabilities,
/// else of their verdicts' scores, so both orders are always scored the
/// same way and a position bias still cancels. `None` when either order
/// has no verdict (the judge failed): a failure never counts as a win.
pub fn prompt_score(model_first: Judged, reference_first: Judged) -> Option<f64> {
    let (vm, vr) = (model_first.verdict?, reference_first.verdict?);
    Some(match (model_first.probs, reference_first.probs) {
        (Some(pm), Some(pr)) => {
            (weighted_score(Order::ModelFirst, pm) + weighted_score(Order::ReferenceFirst, pr))
                / 2.0
        }
        _ => (model_score(Order::ModelFirst, vm) + model_score(Order::ReferenceFirst, vr)) / 2.0,
    })
}

/// The verdict a single generated token stands for: "A", " b", "(a",
/// "[[B", "tie"; `None` for anything else.
fn verdict_token(token: &str) -> Option<Verdict> {
    let t = token.trim_matches(|c: char| !c.is_alphanumeric() || c == '\u{120}' || c == '\u{2581}');
    match t {
        "A" | "a" => Some(Verdict::A),
        "B" | "b" => Some(Verdict::B),
        "tie" | "Tie" | "TIE" => Some(Verdict::Tie),
        _ => None,
    }
}

/// The judge's probabilities at its verdict: the generated token that
/// covers byte `at` of the reply `text` (where [`parse_verdict_at`] read the
/// verdict), which must itself stand for `verdict`, and the "A", "B" and
/// "tie" tokens among that position's `top_logprobs` (OpenAI's
/// `choices[0].logprobs.content`; the chosen token counted when the list
/// leaves it out, each alternative once). `None` when the response has no
/// logprobs, its tokens do not spell the reply, or nothing stands for the
/// verdict there.
pub fn verdict_probs(raw: &Value, text: &str, verdict: Verdict, at: usize) -> Option<VerdictProbs> {
    let content = raw["choices"][0]["logprobs"]["content"].as_array()?;
    let tokens: Vec<&str> = content
        .iter()
        .map(|t| t["token"].as_str())
        .collect::<Option<_>>()?;
    let spelled: String = tokens.concat();
    // Servers may trim the reply's leading whitespace: line the two up.
    let lead = |s: &str| s.len() - s.trim_start().len();
    if spelled.trim() != text.trim() || at < lead(text) {
        return None;
    }
    let at = at - lead(text) + lead(&spelled);
    let mut start = 0;
    let i = tokens.iter().position(|t| {
        let covers = start <= at && at < start + t.len();
        start += t.len();
        covers
    })?;
    if verdict_token(tokens[i]) != Some(verdict) {
        return None;
    }
    let entry = &content[i];
    let mut alts: Vec<(&str, f64)> = Vec::new();
    for alt in entry["top_logprobs"].as_array().into_iter().flatten() {
        if let (Some(t), Some(lp)) = (alt["token"].as_str(), alt["logprob"].as_f64()) {
            if !alts.iter().any(|(seen, _)| *seen == t) {
                alts.push((t, lp));
            }
        }
    }
    if !alts.iter().any(|(t, _)| *t == tokens[i]) {
        alts.push((tokens[i], entry["logprob"].as_f64()?));
    }
    let mut p = VerdictProbs {
        a: 0.0,
        b: 0.0,
        tie: 0.0,
    };
    for (tok, lp) in alts {
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
    (total > 0.0).then(|| VerdictProbs {
        a: p.a / total,
        b: p.b / total,
        tie: p.tie / total,
    })
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
    parse_verdict_at(text).map(|(v, _)| v)
}

/// [`parse_verdict`], with the byte offset in `text` where the verdict was
/// read (its letter, or the start of the tie phrase).
pub fn parse_verdict_at(text: &str) -> Option<(Verdict, usize)> {
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
        let m = c.get(1).expect("group 1");
        return letter(m.as_str()).map(|v| (v, m.start()));
    }
    let mut letters: Vec<(String, usize)> = better
        .captures_iter(text)
        .map(|c| {
            let m = c.get(1).expect("group 1");
            (m.as_str().to_ascii_lowercase(), m.start())
        })
        .collect();
    letters.dedup_by(|x, y| x.0 == y.0);
    let distinct: std::collections::BTreeSet<&str> =
        letters.iter().map(|(l, _)| l.as_str()).collect();
    if distinct.len() > 1 {
        return None; // "Output (a) is better ... output (b) is better"
    }
    let trimmed = text.len() - text.trim_start().len();
    if let Some(c) = leading.captures(text.trim_start()) {
        for g in ["l1", "l2", "l3", "t"] {
            if let Some(m) = c.name(g) {
                let s = m.as_str();
                return letter(if g == "t" { "tie" } else { s }).map(|v| (v, trimmed + m.start()));
            }
        }
    }
    if let Some((l, at)) = letters.first() {
        return letter(l).map(|v| (v, *at));
    }
    tie.find(text).map(|m| (Verdict::Tie, m.start()))
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
        prompt_score(
            Judged {
                verdict: mf,
                probs: None,
            },
            Judged {
                verdict: rf,
                probs: None,
            },
        )
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

    /// A response whose tokens, each with its alternatives, spell the reply.
    fn logprobs_reply(tokens: &[(&str, &[(&str, f64)])]) -> (Value, String) {
        let content: Vec<Value> = tokens
            .iter()
            .map(|(tok, top)| {
                let chosen = top
                    .iter()
                    .find(|(t, _)| t == tok)
                    .map_or(0.0, |(_, p)| p.ln());
                let top: Vec<Value> = top
                    .iter()
                    .map(|(t, p)| json!({"token": t, "logprob": p.ln()}))
                    .collect();
                json!({"token": tok, "logprob": chosen, "top_logprobs": top})
            })
            .collect();
        let text: String = tokens.iter().map(|(t, _)| *t).collect();
        (
            json!({"choices": [{"message": {"content": text}, "logprobs": {"content": content}}]}),
            text,
        )
    }

    fn probs_of(r: &(Value, String)) -> Option<VerdictProbs> {
        let (v, at) = parse_verdict_at(&r.1)?;
        verdict_probs(&r.0, &r.1, v, at)
    }

    fn judged(r: &(Value, String)) -> Judged {
        Judged {
            verdict: parse_verdict(&r.1),
            probs: probs_of(r),
        }
    }

    #[test]
    fn weighted_scores_keep_the_lean_a_biased_judge_hides() {
        // Always "A", but surer when (a) really is better.
        let sure = logprobs_reply(&[("A", &[("A", 0.8), ("B", 0.2)])]);
        let unsure = logprobs_reply(&[("A", &[("A", 0.55), (" B", 0.4), ("C", 0.05)])]);
        let p_sure = probs_of(&sure).unwrap();
        let p_unsure = probs_of(&unsure).unwrap();
        assert!((p_sure.a - 0.8).abs() < 1e-9 && (p_sure.b - 0.2).abs() < 1e-9);
        // "C" is no verdict token: normalised over A and B.
        assert!((p_unsure.b - 0.4 / 0.95).abs() < 1e-9, "{p_unsure:?}");
        // The model's output first and better, then second and still better.
        let s = prompt_score(judged(&sure), judged(&unsure)).unwrap();
        assert!((s - (0.8 + 0.4 / 0.95) / 2.0).abs() < 1e-9);
        assert!(s > 0.5, "by verdicts alone this is exactly 0.5");
        // A tie's probability counts half.
        let t = logprobs_reply(&[("tie", &[("tie", 0.5), ("A", 0.25), ("B", 0.25)])]);
        let s = prompt_score(judged(&t), judged(&t)).unwrap();
        assert!((s - 0.5).abs() < 1e-9);
        // Only one order with probabilities: both scored by their verdicts,
        // so the "A" bias still cancels.
        let plain = Judged {
            verdict: Some(A),
            probs: None,
        };
        assert_eq!(prompt_score(judged(&sure), plain), Some(0.5));
        assert_eq!(prompt_score(plain, judged(&unsure)), Some(0.5));
    }

    #[test]
    fn the_verdict_token_is_where_the_verdict_was_read() {
        // The article "a" and the mention of "(b)" come before the verdict;
        // the probabilities are those at "(a) is better".
        let r = logprobs_reply(&[
            ("This", &[("This", 0.9)]),
            (" is", &[(" is", 0.9)]),
            (" a", &[(" a", 0.9), (" the", 0.1)]),
            (" close call; output", &[(" close call; output", 0.9)]),
            (" (", &[(" (", 0.99)]),
            ("a", &[("a", 0.7), ("b", 0.3)]),
            (") is better", &[(") is better", 1.0)]),
        ]);
        assert_eq!(parse_verdict(&r.1), Some(A));
        let p = probs_of(&r).unwrap();
        assert!(
            (p.a - 0.7).abs() < 1e-9 && (p.b - 0.3).abs() < 1e-9,
            "{p:?}"
        );
        // The chosen token is counted when the alternatives leave it out,
        // and a repeated alternative once.
        let r = logprobs_reply(&[("B", &[("A", 0.5), ("A", 0.5), ("\u{120}B", 0.25)])]);
        let mut v = r.0.clone();
        v["choices"][0]["logprobs"]["content"][0]["logprob"] = json!(0.25f64.ln());
        let p = verdict_probs(&v, &r.1, B, 0).unwrap();
        assert!(
            (p.a - 0.5 / 1.0).abs() < 1e-9 && (p.b - 0.5).abs() < 1e-9,
            "{p:?}"
        );
        // No logprobs (a judge that does not return them): no probabilities.
        let plain = json!({"choices": [{"message": {"content": "A"}}]});
        assert_eq!(verdict_probs(&plain, "A", A, 0), None);
        // Tokens that do not spell the reply: no probabilities.
        let (raw, _) = logprobs_reply(&[("A", &[("A", 0.9)])]);
        assert_eq!(verdict_probs(&raw, "B", B, 0), None);
        // Words that merely start with a letter are not verdict tokens;
        // byte-level BPE and SentencePiece space marks are stripped.
        assert_eq!(verdict_token("Answer"), None);
        assert_eq!(verdict_token(" (a"), Some(A));
        assert_eq!(verdict_token("\u{120}B"), Some(B));
        assert_eq!(verdict_token("\u{2581}tie"), Some(Tie));
        assert_eq!(verdict_token("[["), None);
        // Where each shape of reply reads its verdict.
        assert_eq!(parse_verdict_at("  Verdict: B"), Some((B, 11)));
        assert_eq!(parse_verdict_at("Final verdict: [[A]]"), Some((A, 17)));
        assert_eq!(
            parse_verdict_at("I think output (b) is clearly better."),
            Some((B, 16))
        );
        assert_eq!(parse_verdict_at("It's a tie."), Some((Tie, 0)));
    }

    #[test]
    fn request_places_the_outputs_by_order() {
        let r = request(
            "j",
            16,
            Scoring::Verdict,
            "Say hi",
            "MODEL",
            "REF",
            Order::ModelFirst,
        );
        let u = r["messages"][1]["content"].as_str().unwrap();
        assert!(u.find("MODEL").unwrap() < u.find("REF").unwrap());
        assert_eq!(r["temperature"], 0.0);
        assert!(r.get("logprobs").is_none());
        let r = request(
            "j",
            16,
            Scoring::Weighted,
            "Say hi",
            "MODEL",
            "REF",
            Order::ReferenceFirst,
        );
        assert_eq!(
            (r["logprobs"].clone(), r["top_logprobs"].clone()),
            (json!(true), json!(TOP_LOGPROBS))
        );
        let u = r["messages"][1]["content"].as_str().unwrap();
        assert!(u.find("REF").unwrap() < u.find("MODEL").unwrap());
    }
}
