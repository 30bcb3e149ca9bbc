//! The math answer checker, shared with evaluation: extract the final answer
//! of a response (`\boxed{}`, `The answer is`, `####`, a looser `Answer:`,
//! else the last number), normalise it (commas, LaTeX `{,}`, currency,
//! Unicode minus, units, percent, fractions and mixed numbers, trailing
//! `.0`) and compare it with the gold answer numerically.
//!
//! A gold answer or a `\boxed{}` answer that is a LaTeX expression
//! (`\frac{\sqrt{3}}{2}`, `2^{10}`, `(1, 2)`, `x^2-1`) is read by
//! [`latex`](super::latex): evaluated, and compared with the other by value,
//! by identity at fixed points, element by element, or as normalised text
//! (what it understands and what not is listed there).
//!
//! In an answer segment ("The answer is 9 * 2 = 18.") the number after the
//! last `=` is the answer; without one, the first number. The explicit forms
//! (`\boxed{}`, then "The answer is" / "final answer:", then `####`) win over
//! the loose `answer:` form wherever they stand, and of one form the last
//! occurrence counts, so a later "check the answer: 3 + 15 = 18" does not
//! override "The answer is 18".

use std::sync::OnceLock;

use regex::Regex;

/// What the checker found in a response.
#[derive(Debug, Clone, PartialEq)]
pub struct MathVerdict {
    /// The answer text it extracted, if any.
    pub extracted: Option<String>,
    /// That answer as a number.
    pub value: Option<f64>,
    /// Which rule found it: `boxed`, `answer_is`, `hashes`, `answer`
    /// (the loose `answer:` form), `last_number`.
    pub rule: Option<&'static str>,
    pub correct: bool,
}

fn re(cell: &'static OnceLock<Regex>, pat: &str) -> &'static Regex {
    cell.get_or_init(|| Regex::new(pat).expect("valid regex"))
}

fn number_re() -> &'static Regex {
    static R: OnceLock<Regex> = OnceLock::new();
    // 1,234.5  -3  .5  12  (commas only between digit groups)
    re(&R, r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")
}

fn fraction_re() -> &'static Regex {
    static R: OnceLock<Regex> = OnceLock::new();
    // \frac{a}{b} with an optional whole part (3\frac{1}{2}); a mixed number
    // 3 1/2; a plain a/b.
    re(
        &R,
        r"(-)?(?:(\d+)\s*)?\\[dt]?frac\{\s*(-?[\d.,]+)\s*\}\{\s*(-?[\d.,]+)\s*\}|(-?\d+)\s+(\d+)\s*/\s*(\d+)\b|(-?\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)",
    )
}

/// The explicit phrase: "The answer is", "The final answer is", "Final answer:".
fn answer_is_re() -> &'static Regex {
    static R: OnceLock<Regex> = OnceLock::new();
    re(
        &R,
        r"(?i)\b(?:(?:the\s+)?(?:final\s+)?answer\s+is\b|final\s+answer\s*[:=])\s*:?\s*",
    )
}

/// The loose form: "Answer:", "answer =" (also inside "check the answer: ...").
fn answer_colon_re() -> &'static Regex {
    static R: OnceLock<Regex> = OnceLock::new();
    re(&R, r"(?i)\banswer\s*[:=]\s*")
}

fn parse_plain(s: &str) -> Option<f64> {
    s.replace(',', "")
        .parse::<f64>()
        .ok()
        .filter(|x| x.is_finite())
}

/// Spelling that hides numbers: LaTeX spacing and thousands `{,}`, `$`
/// (removed, so `-$5` is `-5`), the Unicode minus.
fn normalise(text: &str) -> String {
    text.replace("\\!", "")
        .replace("\\,", "")
        .replace("{,}", ",")
        .replace("\\$", "")
        .replace('$', "")
        .replace('\u{2212}', "-")
}

/// The first number of an already normalised segment, with where it ends.
fn first_value(seg: &str) -> Option<(f64, usize)> {
    let num = number_re().find(seg);
    for c in fraction_re().captures_iter(seg) {
        let m = c.get(0).unwrap();
        if num.is_some_and(|n| n.start() < m.start()) {
            break;
        }
        let value = if let (Some(a), Some(b)) = (c.get(3), c.get(4)) {
            // \frac, with its whole part: 3\frac{1}{2} = 3.5, -2\frac14 = -2.25.
            let (a, b) = (parse_plain(a.as_str())?, parse_plain(b.as_str())?);
            let whole = c
                .get(2)
                .and_then(|w| parse_plain(w.as_str()))
                .unwrap_or(0.0);
            (b != 0.0).then(|| {
                let v = whole + a / b;
                if c.get(1).is_some() {
                    -v
                } else {
                    v
                }
            })
        } else if let (Some(w), Some(a), Some(b)) = (c.get(5), c.get(6), c.get(7)) {
            // 3 1/2: only a proper fraction makes a mixed number.
            let (w, a, b) = (
                parse_plain(w.as_str())?,
                parse_plain(a.as_str())?,
                parse_plain(b.as_str())?,
            );
            (b != 0.0 && a < b).then(|| {
                let v = w.abs() + a / b;
                if w.is_sign_negative() {
                    -v
                } else {
                    v
                }
            })
        } else {
            let (a, b) = (
                parse_plain(c.get(8)?.as_str())?,
                parse_plain(c.get(9)?.as_str())?,
            );
            (b != 0.0).then(|| a / b)
        };
        if let Some(v) = value {
            return Some((v, m.end()));
        }
        // "3 4/2" is no mixed number: try what follows (3, then 4/2).
        if num.is_some_and(|n| n.start() == m.start()) {
            break;
        }
    }
    let n = num?;
    Some((parse_plain(n.as_str())?, n.end()))
}

/// The first number in a short answer segment: a fraction (`\frac{3}{4}`,
/// `3/4`), a mixed number (`3\frac{1}{2}`, `3 1/2`) or a plain number with
/// commas, currency or units around it.
pub fn parse_number(segment: &str) -> Option<f64> {
    first_value(&normalise(segment)).map(|(v, _)| v)
}

/// The first sentence of a segment when it holds a number (a `.` ends a
/// sentence unless a digit follows it), else the whole segment.
fn first_sentence(seg: &str) -> &str {
    let b = seg.as_bytes();
    for (i, &c) in b.iter().enumerate() {
        let ends = match c {
            b'.' => !b.get(i + 1).is_some_and(u8::is_ascii_digit),
            b'!' | b'?' | b';' => true,
            _ => false,
        };
        if ends {
            let head = &seg[..i];
            if number_re().is_match(head) {
                return head;
            }
            break;
        }
    }
    seg
}

/// The answer in a segment: the number after the last `=` when one follows
/// it as a result (not `18 = 9 * 2`), else the first number.
fn segment_value(segment: &str) -> Option<f64> {
    let norm = normalise(segment);
    let seg = first_sentence(&norm);
    if let Some(eq) = seg.rfind('=') {
        let after = &seg[eq + 1..];
        if let Some((v, end)) = first_value(after) {
            let rest = after[end..].trim_start();
            let operator = rest.starts_with(['+', '-', '*', '/', '×', '÷', '^', '·'])
                || rest.starts_with("\\times")
                || rest.starts_with("\\cdot")
                || rest.starts_with("\\div");
            if !operator {
                return Some(v);
            }
        }
    }
    first_value(seg).map(|(v, _)| v)
}

/// The content of the last `\boxed{...}` (balanced braces).
pub fn last_boxed(text: &str) -> Option<&str> {
    let start = text.rfind("\\boxed{").or_else(|| text.rfind("\\fbox{"))?;
    let open = start + text[start..].find('{')?;
    let mut depth = 0;
    for (i, ch) in text[open..].char_indices() {
        match ch {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(&text[open + 1..open + i]);
                }
            }
            _ => {}
        }
    }
    None
}

/// The segment after a phrase match: the rest of its line, or the next
/// non-empty line when the phrase ends its line.
fn segment_after(text: &str, end: usize) -> &str {
    text[end..]
        .split('\n')
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
}

/// The last match of `re` whose segment holds an answer.
fn last_phrase(text: &str, re: &Regex) -> Option<(String, f64)> {
    let ends: Vec<usize> = re.find_iter(text).map(|m| m.end()).collect();
    ends.into_iter().rev().find_map(|end| {
        let seg = segment_after(text, end);
        segment_value(seg).map(|v| (seg.trim().to_string(), v))
    })
}

/// Extract the final answer of a response.
pub fn extract(text: &str) -> Option<(String, f64, &'static str)> {
    if let Some(b) = last_boxed(text).filter(|b| !b.trim().is_empty()) {
        // The whole expression's value (`2\sqrt{3}` is not 2); a structure's
        // first number is not its value (`(1, 2)` is not 1); else the answer
        // segment (`18 apples`).
        let value = match super::latex::is_structured(b) {
            true => None,
            false => super::latex::value(b).or_else(|| segment_value(b)),
        };
        // A boxed answer with no value (`(1, 2)`, `x+1`, `\text{(C)}`) is still the answer.
        return Some((b.trim().to_string(), value.unwrap_or(f64::NAN), "boxed"));
    }
    if let Some((seg, v)) = last_phrase(text, answer_is_re()) {
        return Some((seg, v, "answer_is"));
    }
    if let Some(i) = text.rfind("####") {
        let seg = text[i + 4..].split('\n').next().unwrap_or("");
        if let Some(v) = segment_value(seg) {
            return Some((seg.trim().to_string(), v, "hashes"));
        }
    }
    if let Some((seg, v)) = last_phrase(text, answer_colon_re()) {
        return Some((seg, v, "answer"));
    }
    let norm = normalise(text);
    let last = number_re().find_iter(&norm).last()?;
    let v = parse_plain(last.as_str())?;
    Some((last.as_str().to_string(), v, "last_number"))
}

/// The gold answer as a number (`18`, `43.0`, `1,000`, `9 (apples)`, `3/4`,
/// `#### 18`, `\frac{\sqrt{3}}{2}`, `2^{10}`).
pub fn gold_value(gold: &str) -> Option<f64> {
    let g = gold_text(gold);
    if super::latex::is_structured(g) {
        return None; // `(1, 2)`, `x^2+1`: compared as expressions, never by a first number
    }
    super::latex::value(g).or_else(|| parse_number(g))
}

/// The gold answer without a worked solution before `####`.
fn gold_text(gold: &str) -> &str {
    gold.rsplit("####").next().unwrap_or(gold).trim()
}

pub fn numbers_equal(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-6 * b.abs().max(1.0)
}

/// Check a response against a gold answer: by number, or, for a boxed or
/// stated answer that is no plain number, as LaTeX expressions.
pub fn check(response: &str, gold: &str) -> MathVerdict {
    let gold_number = gold_value(gold);
    match extract(response) {
        Some((s, v, rule)) => MathVerdict {
            correct: gold_number.is_some_and(|g| numbers_equal(v, g))
                || (matches!(rule, "boxed" | "answer_is")
                    && super::latex::equivalent(&s, gold_text(gold))),
            extracted: Some(s),
            value: v.is_finite().then_some(v),
            rule: Some(rule),
        },
        None => MathVerdict {
            extracted: None,
            value: None,
            rule: None,
            correct: false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boxed() {
        assert!(check("so we get \\boxed{18}.", "18").correct);
        assert!(check("\\boxed{\\frac{3}{4}}", "0.75").correct);
        assert!(check("\\boxed{\\$1,250}", "1250").correct);
        assert!(check("first \\boxed{2} then \\boxed{5}", "5").correct);
        assert!(check("\\boxed{ {12} }", "12").correct);
        assert!(!check("\\boxed{17}", "18").correct);
        // A boxed answer wins over a later stray number.
        assert!(check("\\boxed{42}\nCheck: 40 + 2 = 42, step 3", "42").correct);
    }

    #[test]
    fn answer_is_and_hashes() {
        let r = "Janet sells 16 - 3 - 4 = 9 eggs.\nShe makes 9 * 2 = $18.\nThe answer is 18.";
        let v = check(r, "18");
        assert!(v.correct);
        assert_eq!(v.rule, Some("answer_is"));
        assert!(check("The answer is $70,000.", "70000").correct);
        assert!(check("The final answer is: 43 seashells", "43.0").correct);
        assert!(check("Answer: 3/4 cup", "0.75").correct);
        assert!(check("... 2+1=3\n#### 3", "3").correct);
        assert!(check("#### 1,000", "1000").correct);
        // The phrase wins over a later number in a check line.
        assert!(check("The answer is 26.\n(28 + 26 = 54)", "26").correct);
        assert!(!check("The answer is 25.", "26").correct);
    }

    #[test]
    fn last_number_units_and_normalisation() {
        assert!(check("He runs 9*60 = 540 meters a week.", "540").correct);
        assert!(check("So the total is 15 balls", "15").correct);
        assert!(check("The answer is 8.0", "8").correct);
        assert!(check("The answer is 8.00 dollars", "8.0").correct);
        assert!(check("It costs $1,234.50 in total", "1234.5").correct);
        assert!(check("The answer is -3", "-3").correct);
        assert!(check("The answer is 50%", "50").correct);
        assert!(check("Sam has 9 apples", "9 (apples)").correct);
        assert!(!check("I don't know.", "9").correct);
        assert_eq!(check("I don't know.", "9").extracted, None);
        assert!(!check("", "9").correct);
        // Commas between digit groups only: "3,4" is two numbers.
        assert!(check("the values 3,4", "4").correct);
    }

    #[test]
    fn gold_parsing() {
        assert_eq!(gold_value("#### 18"), Some(18.0));
        assert_eq!(gold_value("43.0"), Some(43.0));
        assert_eq!(gold_value("9 (apples)"), Some(9.0));
        assert_eq!(gold_value("1,000"), Some(1000.0));
        assert_eq!(gold_value("3/4"), Some(0.75));
        assert_eq!(gold_value("none"), None);
    }

    #[test]
    fn the_answer_after_an_equation_and_the_strongest_form() {
        // "The answer is 9 * 2 = 18": the result, not the first operand.
        let v = check("The answer is 9 * 2 = 18.", "18");
        assert!(v.correct, "{v:?}");
        assert_eq!(v.value, Some(18.0));
        assert!(check("The answer is 16 - 3 - 4 = 9 eggs", "9").correct);
        // Without `=`, the first number of the answer's sentence.
        assert!(check("The answer is 3 because she had 5 and gave 2 away.", "3").correct);
        // `=` followed by an expression is no result: "18 = 9 * 2".
        assert!(check("The answer is 18, since 18 = 9 * 2.", "18").correct);
        // The answer's sentence ends at a full stop.
        assert!(check("The answer is 12. Also, x = 5 here.", "12").correct);
        assert!(check("The answer is $9 \\times 2 = \\$18$.", "18").correct);
        // A later, looser "answer:" in a check line does not override "The answer is".
        let v = check(
            "The answer is 18.\nLet me check the answer: 3 + 15 = 18",
            "18",
        );
        assert_eq!(v.value, Some(18.0), "{v:?}");
        let v = check(
            "The answer is 18.\nCheck the answer: 3 is the first term.",
            "18",
        );
        assert_eq!(v.value, Some(18.0), "{v:?}");
        assert_eq!(v.rule, Some("answer_is"));
        // The last of the strongest form wins.
        assert!(
            check(
                "The answer is 12.\nWait, I made an error. The answer is 14.",
                "14"
            )
            .correct
        );
        assert!(check("#### 7\nanswer: 3", "7").correct);
        assert!(check("Answer: 3\n#### 7", "7").correct);
        assert!(check("Answer: 5", "5").correct);
        // Forms inside \boxed and around numbers.
        assert_eq!(check("\\boxed{1{,}234}", "1234").value, Some(1234.0));
        assert!(check("\\boxed{1{,}234}", "1234").correct);
        assert_eq!(check("The answer is -$5.", "-5").value, Some(-5.0));
        assert_eq!(check("She lost -$5 in total", "-5").value, Some(-5.0));
        assert_eq!(check("The answer is −5", "-5").value, Some(-5.0));
        assert_eq!(
            check("The temperature fell to −12 degrees", "-12").value,
            Some(-12.0)
        );
        assert_eq!(check("\\boxed{3\\frac{1}{2}}", "3.5").value, Some(3.5));
        assert_eq!(check("The answer is 3 1/2 cups.", "3.5").value, Some(3.5));
        assert_eq!(check("The answer is -2 1/4", "-2.25").value, Some(-2.25));
        assert_eq!(check("The answer is 1/2", "0.5").value, Some(0.5));
        assert_eq!(gold_value("3 1/2"), Some(3.5));
        // A mixed number needs a proper fraction: "3 4/2" is not one.
        assert_eq!(parse_number("3 1/2"), Some(3.5));
        assert_eq!(parse_number("3 4/2"), Some(3.0));
        assert_eq!(parse_number("2 + \\frac{1}{2}"), Some(2.0));
    }

    #[test]
    fn latex_answers_of_the_competition_sets() {
        assert!(check("so \\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}").correct);
        assert!(check("\\boxed{2\\sqrt{3}}", "\\sqrt{12}").correct);
        // The boxed expression's value, not its first number.
        assert!(!check("\\boxed{2\\sqrt{3}}", "2").correct);
        assert_eq!(check("\\boxed{2^{10}}", "1024").value, Some(1024.0));
        assert!(check("\\boxed{(1, \\frac{1}{2})}", "(1,0.5)").correct);
        assert!(check("\\boxed{(x+1)^2}", "x^2+2x+1").correct);
        assert!(!check("\\boxed{(x+1)^2}", "x^2+1").correct);
        assert!(check("\\boxed{\\text{(C)}}", "\\text{(C)}").correct);
        assert!(check("The answer is \\frac{3}{8}.", "0.375").correct);
        assert!(check("\\boxed{25\\%}", "25").correct);
        assert!(check("\\boxed{0.5}", "\\dfrac{1}{2}").correct);
        assert!(!check("\\boxed{x+1}", "2").correct);
        assert!(check("\\boxed{1+x}", "x+1").correct);
        // Units inside the box still give the number.
        assert!(check("\\boxed{18 apples}", "18").correct);
        // A structured gold or answer is never its first number.
        assert!(!check("\\boxed{1}", "(1, 2)").correct);
        assert!(!check("\\boxed{2}", "x^2+7x+10").correct);
        assert!(!check("\\boxed{5}", "[-2, 5)").correct);
        assert!(!check("\\boxed{(1,2)}", "1").correct);
        assert_eq!(gold_value("(1, 2)"), None);
        // An empty box is no answer: the stated one counts.
        assert!(check("\\boxed{}\nThe answer is 18.", "18").correct);
        assert!(check("#### 18", "Natalia sold 48/2 = 24 clips.\n#### 18").correct);
    }
}
