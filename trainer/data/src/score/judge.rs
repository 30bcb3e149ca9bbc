//! LLM-as-judge: any chat endpoint rates a response 1-10 against a fixed
//! rubric; the rating is parsed robustly from whatever the judge writes.

use std::sync::OnceLock;

use regex::Regex;
use serde_json::json;

use crate::client::Endpoint;

pub const RUBRIC: &str = "You are a strict, impartial judge of answers written by AI assistants. \
Rate the answer to the user's request on a scale of 1 to 10 using this rubric:\n\
10: fully correct, complete, clear and directly helpful.\n\
7-9: correct and helpful with minor omissions or verbosity.\n\
4-6: partly correct or partly helpful, with clear gaps or errors.\n\
2-3: mostly wrong, off-topic or unhelpful.\n\
1: empty, nonsensical, harmful or a refusal without reason.\n\
Reply with the rating first, in exactly the form \"Rating: N\", then at most one sentence of reason.";

pub fn judge_messages(question: &str, answer: &str) -> serde_json::Value {
    json!([
        {"role": "system", "content": RUBRIC},
        {"role": "user", "content": format!(
            "[User request]\n{question}\n[End of user request]\n\n[Answer]\n{answer}\n[End of answer]\n\nRate the answer. Start with \"Rating: N\"."
        )},
    ])
}

fn valid(x: f64) -> Option<f64> {
    (1.0..=10.0).contains(&x).then_some(x)
}

/// The rating in a judge's reply, 1-10, or `None` when there is none.
pub fn parse_rating(text: &str) -> Option<f64> {
    static PATS: OnceLock<Vec<Regex>> = OnceLock::new();
    let pats = PATS.get_or_init(|| {
        [
            r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]",
            r"(?i)(?:rating|score|grade)\s*(?:is|of|=|:)?\s*:?\s*\**\s*\[?\s*(\d+(?:\.\d+)?)\s*\]?(?:\s*(?:/|out of)\s*10)?",
            // "I would rate this answer 7", "I'd rate it a 6", "Rated: 8",
            // "My rating for this answer: 4": a form of "rate", a few filler
            // words, the number.
            r"(?i)\brat(?:e|es|ed|ing)\b(?:\s+(?:it|this|that|the|its|my|your|his|her|answer|response|reply|one|overall|final|for|as|a|an|at|is|be|would|should|i)\b){0,6}\s*[:=]?\s*\**\s*\[?\s*(\d+(?:\.\d+)?)",
            r"(?i)\b(\d+(?:\.\d+)?)\s*(?:/|out of)\s*10\b",
            r"^\s*\**\s*(\d+(?:\.\d+)?)\s*\**\s*(?:$|[.\n:,)-])",
        ]
        .iter()
        .map(|p| Regex::new(p).unwrap())
        .collect()
    });
    for re in pats {
        if let Some(c) = re.captures(text) {
            if let Some(v) = c
                .get(1)
                .and_then(|m| m.as_str().parse::<f64>().ok())
                .and_then(valid)
            {
                return Some(v);
            }
        }
    }
    None
}

/// Ask the judge; the rating and the judge's reply.
pub async fn judge(
    ep: &Endpoint,
    model: &str,
    max_tokens: u64,
    question: &str,
    answer: &str,
) -> Result<(f64, String), String> {
    if answer.trim().is_empty() {
        return Ok((1.0, "empty answer (not sent to the judge)".into()));
    }
    let body = json!({
        "model": model,
        "messages": judge_messages(question, answer),
        "max_tokens": max_tokens,
        "temperature": 0.0,
    });
    let r = ep.chat(&body).await.map_err(|e| e.to_string())?;
    match parse_rating(&r.text) {
        Some(v) => Ok((v, r.text)),
        None => Err(format!(
            "no 1-10 rating in the judge's reply: {}",
            crate::client::clip(&r.text, 200)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_rating;

    #[test]
    fn ratings_in_many_shapes() {
        assert_eq!(
            parse_rating("Rating: 7\nThe answer is mostly right."),
            Some(7.0)
        );
        assert_eq!(parse_rating("Rating: [[9]]"), Some(9.0));
        assert_eq!(parse_rating("**Rating:** 8/10 because"), Some(8.0));
        assert_eq!(
            parse_rating("I would give this a score of 6 out of 10."),
            Some(6.0)
        );
        assert_eq!(parse_rating("rating = 10"), Some(10.0));
        assert_eq!(parse_rating("Rating: 7.5"), Some(7.5));
        assert_eq!(parse_rating("3/10 - wrong answer"), Some(3.0));
        assert_eq!(parse_rating("5. The answer misses the point."), Some(5.0));
        assert_eq!(parse_rating("  **4**"), Some(4.0));
        // Out of range or absent.
        assert_eq!(parse_rating("Rating: 0"), None);
        assert_eq!(parse_rating("Rating: 11"), None);
        assert_eq!(parse_rating("The answer lists 3 actors."), None);
        assert_eq!(parse_rating(""), None);
        assert_eq!(parse_rating("I cannot rate this."), None);
    }

    #[test]
    fn rate_forms() {
        assert_eq!(parse_rating("I would rate this answer 7"), Some(7.0));
        assert_eq!(
            parse_rating("I'd rate it a 6 because it is vague."),
            Some(6.0)
        );
        assert_eq!(parse_rating("Rated: 8"), Some(8.0));
        assert_eq!(parse_rating("I rate the response 9/10."), Some(9.0));
        assert_eq!(parse_rating("My rating for this answer: 4"), Some(4.0));
        assert_eq!(parse_rating("Rate: **5**"), Some(5.0));
        // Still nothing where no rating is given.
        assert_eq!(parse_rating("I would rate this answer highly."), None);
    }
}
