//! Final answers written in LaTeX, as the competition math sets write them
//! (MATH, NuminaMath, AIME-style `\boxed{}` answers): parsed into an
//! expression, evaluated, and compared with a gold answer by value.
//!
//! Understood: numbers (with `{,}` and `,` thousands), `+ - * /`, `^`,
//! `\cdot`, `\times`, `\div`, implicit products (`2\sqrt{3}`, `3x`, `2(x+1)`),
//! `\frac`, `\dfrac`, `\tfrac` (also `\frac12`), `\sqrt{}`, `\sqrt[n]{}`,
//! `\pi`, `e` as a variable, `\left`/`\right`, `( ) [ ] \{ \}`, `\%` and `%`
//! (read as the number itself, as the numeric checker does), degrees
//! (`^\circ`, `^{\circ}`), `\text{...}`/`\mathrm{...}` units after a value
//! (dropped, with their exponent), single-letter variables, `x = 3` (one
//! variable's value), and tuples and intervals `(a, b)`, `[a, b)`, compared
//! element by element with the same brackets; a set `\{a, b\}` is read as
//! an ordered tuple (so `\{2, 1\}` differs from `\{1, 2\}`).
//!
//! Two answers are equal when both evaluate to numbers within a relative
//! 1e-6, or, with variables, when they agree at several fixed points (a
//! polynomial identity test: `x^2-1` equals `(x-1)(x+1)`). Anything else
//! (intervals with `\infty`, matrices, words such as names, several
//! equations, text answers such as `\text{(C)}`) is compared as normalised text: spaces, `\text{}`, `\mathrm{}`, `\left`,
//! `\right`, `$` and a trailing full stop removed.

/// A parsed answer.
#[derive(Debug, Clone, PartialEq)]
enum Expr {
    Num(f64),
    Var(char),
    Neg(Box<Expr>),
    Add(Box<Expr>, Box<Expr>),
    Sub(Box<Expr>, Box<Expr>),
    Mul(Box<Expr>, Box<Expr>),
    Div(Box<Expr>, Box<Expr>),
    Pow(Box<Expr>, Box<Expr>),
    Root(Box<Expr>, Box<Expr>),
}

impl Expr {
    fn eval(&self, vars: &dyn Fn(char) -> f64) -> f64 {
        use Expr::*;
        match self {
            Num(x) => *x,
            Var(c) => vars(*c),
            Neg(a) => -a.eval(vars),
            Add(a, b) => a.eval(vars) + b.eval(vars),
            Sub(a, b) => a.eval(vars) - b.eval(vars),
            Mul(a, b) => a.eval(vars) * b.eval(vars),
            Div(a, b) => a.eval(vars) / b.eval(vars),
            Pow(a, b) => a.eval(vars).powf(b.eval(vars)),
            Root(n, a) => {
                let (n, a) = (n.eval(vars), a.eval(vars));
                // An odd root of a negative number is real.
                if a < 0.0 && n.fract() == 0.0 && (n as i64) % 2 == 1 {
                    -(-a).powf(1.0 / n)
                } else {
                    a.powf(1.0 / n)
                }
            }
        }
    }

    fn vars(&self, out: &mut Vec<char>) {
        use Expr::*;
        match self {
            Num(_) => {}
            Var(c) => {
                if !out.contains(c) {
                    out.push(*c)
                }
            }
            Neg(a) => a.vars(out),
            Add(a, b) | Sub(a, b) | Mul(a, b) | Div(a, b) | Pow(a, b) | Root(a, b) => {
                a.vars(out);
                b.vars(out);
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Num(f64),
    Var(char),
    Op(char),
    Open(char),
    Close(char),
    /// `\frac`, `\sqrt`, `\pi`, ...: the command's name.
    Cmd(String),
}

/// Spelling removed before tokenising: spacing, sizing and wrappers that
/// carry no value.
fn strip_decoration(s: &str) -> String {
    let mut t = s.trim().trim_matches('$').to_string();
    // `\left(` and `\right]` are their brackets (not `\rightarrow`).
    for d in ["(", ")", "[", "]", "\\{", "\\}", "|"] {
        t = t
            .replace(&format!("\\left{d}"), d)
            .replace(&format!("\\right{d}"), d);
    }
    for (from, to) in [
        ("\\left.", ""),
        ("\\right.", ""),
        ("\\!", ""),
        ("\\,", ""),
        ("\\;", ""),
        ("\\:", ""),
        ("\\ ", ""),
        ("\\displaystyle", ""),
        ("{,}", ""),
        ("^{\\circ}", ""),
        ("^\\circ", ""),
        ("\\circ", ""),
        ("\\%", ""),
        ("%", ""),
        ("\\$", ""),
        ("\u{2212}", "-"),
        ("\\dfrac", "\\frac"),
        ("\\tfrac", "\\frac"),
        ("\\{", "("),
        ("\\}", ")"),
    ] {
        t = t.replace(from, to);
    }
    // Units after a value: `5 \text{ cm}`, `\mathrm{m}`; a text-only answer is kept.
    for cmd in ["\\text", "\\mathrm", "\\textbf", "\\mbox"] {
        while let Some(i) = t.find(cmd) {
            let Some(open) = t[i..].find('{').map(|o| i + o) else {
                break;
            };
            let Some(close) = matching_brace(&t, open) else {
                break;
            };
            if t[..i].trim().is_empty() {
                break; // the answer itself is text
            }
            // The unit's own exponent goes with it: `5 \text{ cm}^2` is 5.
            let end = unit_exponent_end(&t, close + 1);
            t.replace_range(i..end, "");
        }
    }
    let t = t.trim().trim_end_matches('.').trim();
    // `x = 3` and `y=\frac12`: the value of one variable; `x=2 or x=3` and
    // `x = 1, y = 2` stay as they are (and parse as nothing).
    let mut chars = t.chars();
    let single = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.as_str().trim_start().starts_with('=')
        && t.matches('=').count() == 1;
    match single {
        true => t[t.find('=').unwrap_or(0) + 1..].trim().to_string(),
        false => t.to_string(),
    }
}

/// Where a `^2` or `^{2}` right after `at` ends (`at` when there is none).
fn unit_exponent_end(t: &str, at: usize) -> usize {
    let rest = &t[at..];
    let trimmed = rest.trim_start();
    let Some(exp) = trimmed.strip_prefix('^') else {
        return at;
    };
    let exp_trim = exp.trim_start();
    let start = at + (rest.len() - trimmed.len()) + 1 + (exp.len() - exp_trim.len());
    if exp_trim.starts_with('{') {
        matching_brace(t, start).map_or(at, |c| c + 1)
    } else {
        exp_trim.chars().next().map_or(at, |c| start + c.len_utf8())
    }
}

fn matching_brace(s: &str, open: usize) -> Option<usize> {
    let mut depth = 0;
    for (i, c) in s[open..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(open + i);
                }
            }
            _ => {}
        }
    }
    None
}

fn tokens(s: &str) -> Option<Vec<Tok>> {
    let chars: Vec<char> = s.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_digit()
                    || (chars[i] == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit))
                    // 1,234: a comma followed by exactly three digits.
                    || (chars[i] == ','
                        && chars.len() >= i + 4
                        && chars[i + 1..i + 4].iter().all(char::is_ascii_digit)
                        && !chars.get(i + 4).is_some_and(char::is_ascii_digit)))
            {
                i += 1;
            }
            let text: String = chars[start..i].iter().filter(|c| **c != ',').collect();
            // Two numbers in a row (`3 1/2`, `1 000`) are no expression here:
            // the numeric checker reads those.
            if matches!(out.last(), Some(Tok::Num(_))) {
                return None;
            }
            out.push(Tok::Num(text.parse().ok()?));
        } else if c == '\\' {
            let start = i + 1;
            i += 1;
            while i < chars.len() && chars[i].is_ascii_alphabetic() {
                i += 1;
            }
            if i == start {
                return None;
            }
            out.push(Tok::Cmd(chars[start..i].iter().collect()));
        } else if c.is_ascii_alphabetic() {
            // A word (`Leon`, `apples`) is no product of variables: not an expression.
            if chars.get(i + 1).is_some_and(char::is_ascii_alphabetic) {
                return None;
            }
            out.push(Tok::Var(c));
            i += 1;
        } else if "+-*/^".contains(c) || c == '×' || c == '÷' || c == '·' {
            out.push(Tok::Op(match c {
                '×' | '·' => '*',
                '÷' => '/',
                other => other,
            }));
            i += 1;
        } else if "({[".contains(c) {
            out.push(Tok::Open(c));
            i += 1;
        } else if ")}]".contains(c) {
            out.push(Tok::Close(c));
            i += 1;
        } else if c == ',' {
            out.push(Tok::Op(','));
            i += 1;
        } else {
            return None;
        }
    }
    Some(out)
}

/// `a/b` of whole numbers with `a < b`: the fraction of a mixed number.
fn proper_fraction(f: &Expr) -> bool {
    match f {
        Expr::Div(a, b) => match (a.as_ref(), b.as_ref()) {
            (Expr::Num(a), Expr::Num(b)) => {
                a.fract() == 0.0 && b.fract() == 0.0 && 0.0 <= *a && a < b
            }
            _ => false,
        },
        _ => false,
    }
}

/// A whole number literal, possibly negated: the integer part of a mixed number.
fn whole_number(e: &Expr) -> Option<(f64, bool)> {
    match e {
        Expr::Num(n) if n.fract() == 0.0 => Some((*n, false)),
        Expr::Neg(inner) => match inner.as_ref() {
            Expr::Num(n) if n.fract() == 0.0 => Some((*n, true)),
            _ => None,
        },
        _ => None,
    }
}

/// Recursive descent over the tokens: sum > product (with implicit
/// products) > unary minus > power > atom.
struct Parser {
    toks: Vec<Tok>,
    pos: usize,
    /// Nesting so far; a deeper answer is no answer (and no stack overflow).
    depth: usize,
}

const MAX_DEPTH: usize = 64;

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }

    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).cloned();
        self.pos += 1;
        t
    }

    fn sum(&mut self) -> Option<Expr> {
        let mut e = self.product()?;
        while let Some(Tok::Op(op @ ('+' | '-'))) = self.peek().cloned() {
            self.pos += 1;
            let rhs = self.product()?;
            e = match op {
                '+' => Expr::Add(Box::new(e), Box::new(rhs)),
                _ => Expr::Sub(Box::new(e), Box::new(rhs)),
            };
        }
        Some(e)
    }

    fn starts_atom(&self) -> bool {
        match self.peek() {
            Some(Tok::Num(_) | Tok::Var(_) | Tok::Open(_)) => true,
            Some(Tok::Cmd(c)) => !matches!(c.as_str(), "cdot" | "times" | "div"),
            _ => false,
        }
    }

    fn product(&mut self) -> Option<Expr> {
        let mut e = self.unary()?;
        loop {
            let op = match self.peek() {
                Some(Tok::Op(op @ ('*' | '/'))) => *op,
                Some(Tok::Cmd(c)) if c == "cdot" || c == "times" => '*',
                Some(Tok::Cmd(c)) if c == "div" => '/',
                Some(Tok::Cmd(c)) if c == "frac" && whole_number(&e).is_some() => {
                    // A mixed number: 3\frac{1}{2} is 3.5, -2\frac14 is -2.25;
                    // any other fraction after a number is a product (2\frac{\sqrt3}{3}).
                    let (n, negative) = whole_number(&e)?;
                    let f = self.power()?;
                    e = match proper_fraction(&f) {
                        true => {
                            let sum = Expr::Add(Box::new(Expr::Num(n)), Box::new(f));
                            match negative {
                                true => Expr::Neg(Box::new(sum)),
                                false => sum,
                            }
                        }
                        false => Expr::Mul(Box::new(e), Box::new(f)),
                    };
                    continue;
                }
                _ if self.starts_atom() => {
                    // Implicit product: 2\sqrt{3}, 3x, 2(x+1).
                    let rhs = self.power()?;
                    e = Expr::Mul(Box::new(e), Box::new(rhs));
                    continue;
                }
                _ => break,
            };
            self.pos += 1;
            let rhs = self.unary()?;
            e = match op {
                '*' => Expr::Mul(Box::new(e), Box::new(rhs)),
                _ => Expr::Div(Box::new(e), Box::new(rhs)),
            };
        }
        Some(e)
    }

    fn unary(&mut self) -> Option<Expr> {
        match self.peek() {
            Some(Tok::Op('-')) => {
                self.pos += 1;
                self.depth += 1;
                let e = match self.depth > MAX_DEPTH {
                    true => None,
                    false => self.unary(),
                };
                self.depth -= 1;
                Some(Expr::Neg(Box::new(e?)))
            }
            Some(Tok::Op('+')) => {
                self.pos += 1;
                self.unary()
            }
            _ => self.power(),
        }
    }

    fn power(&mut self) -> Option<Expr> {
        let base = self.atom()?;
        if let Some(Tok::Op('^')) = self.peek() {
            self.pos += 1;
            let exp = self.unary_atom()?;
            return Some(Expr::Pow(Box::new(base), Box::new(exp)));
        }
        Some(base)
    }

    /// An exponent: `^2`, `^{n+1}`, `^-1`.
    fn unary_atom(&mut self) -> Option<Expr> {
        if let Some(Tok::Op('-')) = self.peek() {
            self.pos += 1;
            self.depth += 1;
            let e = match self.depth > MAX_DEPTH {
                true => None,
                false => self.unary_atom(),
            };
            self.depth -= 1;
            return Some(Expr::Neg(Box::new(e?)));
        }
        self.power()
    }

    /// A group `{...}` or a single token (`\frac12`: its arguments are digits).
    fn argument(&mut self) -> Option<Expr> {
        match self.peek()? {
            Tok::Open('{') => self.atom(),
            Tok::Num(x) => {
                let x = *x;
                self.pos += 1;
                // `\frac12`: one digit per argument.
                let text = format!("{x}");
                if text.len() > 1 && !text.contains('.') {
                    let first: f64 = text[..1].parse().ok()?;
                    let rest: f64 = text[1..].parse().ok()?;
                    self.pos -= 1;
                    self.toks[self.pos] = Tok::Num(rest);
                    return Some(Expr::Num(first));
                }
                Some(Expr::Num(x))
            }
            _ => self.atom(),
        }
    }

    fn atom(&mut self) -> Option<Expr> {
        self.depth += 1;
        let e = match self.depth > MAX_DEPTH {
            true => None,
            false => self.atom_inner(),
        };
        self.depth -= 1;
        e
    }

    fn atom_inner(&mut self) -> Option<Expr> {
        match self.next()? {
            Tok::Num(x) => Some(Expr::Num(x)),
            Tok::Var(c) => Some(Expr::Var(c)),
            Tok::Open(open) => {
                let e = self.sum()?;
                let close = match open {
                    '(' => ')',
                    '[' => ']',
                    _ => '}',
                };
                match self.next()? {
                    Tok::Close(c) if c == close => Some(e),
                    _ => None,
                }
            }
            Tok::Cmd(name) => match name.as_str() {
                "frac" => {
                    let a = self.argument()?;
                    let b = self.argument()?;
                    Some(Expr::Div(Box::new(a), Box::new(b)))
                }
                "sqrt" => {
                    let n = match self.peek() {
                        Some(Tok::Open('[')) => self.atom()?,
                        _ => Expr::Num(2.0),
                    };
                    let a = self.argument()?;
                    Some(Expr::Root(Box::new(n), Box::new(a)))
                }
                "pi" => Some(Expr::Num(std::f64::consts::PI)),
                _ => None,
            },
            _ => None,
        }
    }
}

/// An answer: one expression, or the elements of a tuple or interval and
/// its brackets (`[1, 3)` is not `(1, 3)`).
#[derive(Debug)]
struct Answer {
    items: Vec<Expr>,
    brackets: Option<(Tok, Tok)>,
}

/// Answers longer than this are no final answers: not parsed.
const MAX_TOKENS: usize = 400;

fn parse(answer: &str) -> Option<Answer> {
    let toks = tokens(&strip_decoration(answer))?;
    if toks.is_empty() || toks.len() > MAX_TOKENS {
        return None;
    }
    // A tuple or list: `(1, 2)`, `1, 2`: split at top-level commas.
    let (inner, wrapped) = match (toks.first(), toks.last()) {
        (Some(Tok::Open('(' | '[')), Some(Tok::Close(')' | ']')))
            if toks.iter().any(|t| *t == Tok::Op(',')) =>
        {
            (&toks[1..toks.len() - 1], true)
        }
        _ => (&toks[..], false),
    };
    let mut parts = vec![Vec::new()];
    let mut depth = 0i32;
    for t in inner {
        match t {
            Tok::Open(_) => depth += 1,
            Tok::Close(_) => depth -= 1,
            Tok::Op(',') if depth == 0 => {
                parts.push(Vec::new());
                continue;
            }
            _ => {}
        }
        parts.last_mut()?.push(t.clone());
    }
    if wrapped && depth != 0 {
        return None;
    }
    let items = parts
        .into_iter()
        .map(|toks| {
            let mut p = Parser {
                toks,
                pos: 0,
                depth: 0,
            };
            let e = p.sum()?;
            (p.pos == p.toks.len()).then_some(e)
        })
        .collect::<Option<Vec<Expr>>>()?;
    let brackets = wrapped.then(|| (toks[0].clone(), toks[toks.len() - 1].clone()));
    Some(Answer { items, brackets })
}

/// Whether an answer is a structure (a tuple, an interval, an expression
/// with variables) rather than a number: its first number is not its value.
pub fn is_structured(answer: &str) -> bool {
    parse(answer).is_some_and(|a| {
        let mut vars = Vec::new();
        a.items.iter().for_each(|e| e.vars(&mut vars));
        a.items.len() > 1 || !vars.is_empty()
    })
}

/// The answer's value when it is one constant expression (`\frac{\sqrt3}{2}`,
/// `2^{10}`, `50\%`), else `None`.
pub fn value(answer: &str) -> Option<f64> {
    match parse(answer)?.items.as_slice() {
        [e] => {
            let mut vars = Vec::new();
            e.vars(&mut vars);
            let v = e.eval(&|_| f64::NAN);
            (vars.is_empty() && v.is_finite()).then_some(v)
        }
        _ => None,
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-6 * a.abs().max(b.abs()).max(1.0)
}

/// Fixed points for the identity test: irrational-looking, distinct per variable.
const POINTS: [f64; 5] = [0.5772, 1.4142, 2.7183, -1.3247, 3.1623];

fn same_expr(a: &Expr, b: &Expr) -> bool {
    let mut vars = Vec::new();
    a.vars(&mut vars);
    b.vars(&mut vars);
    let mut agreed = 0;
    for (k, &p) in POINTS.iter().enumerate() {
        let at = |c: char| {
            let i = vars.iter().position(|v| *v == c).unwrap_or(0);
            p + 0.731 * i as f64 + 0.1 * k as f64
        };
        let (x, y) = (a.eval(&at), b.eval(&at));
        match (x.is_finite(), y.is_finite()) {
            (true, true) if close(x, y) => agreed += 1,
            (true, true) => return false,
            (false, false) => {}
            _ => return false,
        }
        if vars.is_empty() {
            break;
        }
    }
    agreed > 0
}

/// Normalised text for answers that are not expressions.
fn text_key(answer: &str) -> String {
    let mut t = answer.trim().trim_matches('$').to_string();
    for cmd in ["\\text", "\\mathrm", "\\textbf", "\\mbox"] {
        t = t.replace(cmd, "");
    }
    for (from, to) in [
        ("\\left", ""),
        ("\\right", ""),
        ("\\dfrac", "\\frac"),
        ("\\tfrac", "\\frac"),
        ("\\!", ""),
        ("\\,", ""),
    ] {
        t = t.replace(from, to);
    }
    t.chars()
        .filter(|c| !c.is_whitespace() && *c != '{' && *c != '}')
        .collect::<String>()
        .trim_end_matches('.')
        .to_lowercase()
}

/// Whether a response's final answer (e.g. the content of its `\boxed{}`)
/// equals the gold answer: by value, by identity at fixed points when it
/// has variables, element by element for tuples, else as normalised text.
pub fn equivalent(answer: &str, gold: &str) -> bool {
    if let (Some(a), Some(g)) = (parse(answer), parse(gold)) {
        if a.brackets == g.brackets
            && a.items.len() == g.items.len()
            && a.items.iter().zip(&g.items).all(|(x, y)| same_expr(x, y))
        {
            return true;
        }
    }
    let (a, g) = (text_key(answer), text_key(gold));
    !g.is_empty() && a == g
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_of_latex_answers() {
        let v = |s: &str| value(s).unwrap_or_else(|| panic!("no value for {s}"));
        assert!(close(v("\\frac{3}{4}"), 0.75));
        assert!(close(v("\\dfrac{1}{2}"), 0.5));
        assert!(close(v("\\frac12"), 0.5));
        assert!(close(v("-\\frac{7}{3}"), -7.0 / 3.0));
        assert!(close(v("\\frac{\\sqrt{3}}{2}"), 3f64.sqrt() / 2.0));
        assert!(close(v("2\\sqrt{3}"), 2.0 * 3f64.sqrt()));
        assert!(close(v("\\sqrt[3]{27}"), 3.0));
        assert!(close(v("\\sqrt[3]{-8}"), -2.0));
        assert!(close(v("2^{10}"), 1024.0));
        assert!(close(v("10^{-2}"), 0.01));
        assert!(close(v("3\\pi"), 3.0 * std::f64::consts::PI));
        assert!(close(v("\\left(\\frac{1}{2}\\right)^2"), 0.25));
        assert!(close(v("50\\%"), 50.0));
        assert!(close(v("1{,}234"), 1234.0));
        assert!(close(v("1,234,567"), 1234567.0));
        assert!(close(v("90^\\circ"), 90.0));
        assert!(close(v("5 \\text{ cm}"), 5.0));
        assert!(close(v("x = 4"), 4.0));
        assert!(close(v("3 \\cdot 4 \\div 2"), 6.0));
        assert!(close(v("$\\$12.50$"), 12.5));
        assert!(close(v("3\\frac{1}{2}"), 3.5));
        assert!(close(v("-2\\frac14"), -2.25));
        assert_eq!(value("3 1/2"), None);
        assert!(close(v("2\\frac{\\sqrt{3}}{3}"), 2.0 * 3f64.sqrt() / 3.0));
        assert!(close(v("5 \\text{ cm}^2"), 5.0));
        assert_eq!(value("9 apples"), None);
        assert_eq!(value("x + 1"), None);
        assert_eq!(value("(1, 2)"), None);
        assert_eq!(value("\\text{(C)}"), None);
        assert_eq!(value("\\frac{1}{0}"), None);
    }

    fn v_of(s: &str) -> f64 {
        value(s).unwrap()
    }

    #[test]
    fn equivalence_by_value_identity_tuples_and_text() {
        assert!(equivalent("\\frac{1}{2}\\sqrt{3}", "\\frac{\\sqrt{3}}{2}"));
        assert!(equivalent("0.5", "\\frac{1}{2}"));
        assert!(equivalent("\\dfrac{6}{4}", "\\frac{3}{2}"));
        assert!(!equivalent("\\frac{2}{3}", "\\frac{3}{2}"));
        assert!(equivalent("(x-1)(x+1)", "x^2-1"));
        assert!(equivalent("2(a+b)", "2a + 2b"));
        assert!(!equivalent("x^2+1", "x^2-1"));
        assert!(equivalent("(1, \\frac{1}{2})", "\\left(1,0.5\\right)"));
        assert!(!equivalent("(1, 2)", "(2, 1)"));
        assert!(!equivalent("(1, 2)", "(1, 2, 3)"));
        assert!(equivalent("\\text{(C)}", "\\text{(C)}"));
        assert!(equivalent("\\text{Evelyn}", "\\text{evelyn}."));
        assert!(equivalent("(-\\infty, 3]", "(-\\infty,3]"));
        assert!(!equivalent("(-\\infty, 3)", "(-\\infty,3]"));
        assert!(!equivalent("", "5"));
        // Review cases: brackets, names, unit exponents, hedges, mixed numbers, depth.
        assert!(!equivalent("[1, 3)", "(1, 3)"));
        assert!(equivalent("[1, 3)", "[1,3)"));
        assert!(!equivalent("Leon", "Noel"));
        assert!(equivalent("\\text{Leon}", "Leon"));
        assert!(!equivalent("x=2 \\text{ or } x=3", "3"));
        assert!(!equivalent("x = 1, y = 2", "2"));
        assert!(equivalent("x = 3", "3"));
        assert!(equivalent("\\left[1, 2\\right]", "[1,2]"));
        // Nesting past the limit is no answer (and no stack overflow).
        let deep = format!("{}1{}", "(".repeat(150), ")".repeat(150));
        assert_eq!(value(&deep), None);
        assert_eq!(value(&format!("{}5", "-".repeat(300))), None);
        assert!(close(v_of("((((1))))"), 1.0));
        assert!(is_structured("(1, 2)") && is_structured("x^2+1") && !is_structured("\\frac12"));
    }
}
