//! `formula`: a small, safe arithmetic language over named query results.
//!
//! Numbers, `+ - * /`, unary minus, parentheses and the functions `min`,
//! `max`, `ceil`, `floor`, `round`, `abs`, `clamp(x, lo, hi)`. Names are
//! resolved when the trigger is parsed, so an unknown name is refused at once;
//! evaluation never panics and never yields NaN or ±Inf: division by zero,
//! overflow and `clamp` with `lo > hi` are errors, because a made-up number
//! would be acted on by the autoscaler.

use std::fmt;

/// Longest formula accepted, in bytes.
const MAX_LEN: usize = 4096;
/// Deepest nesting accepted, both of brackets (the parser recurses into
/// them, a few frames per bracket) and of the tree (evaluating, comparing,
/// cloning and dropping it recurse): a chain of operators nests as deep as it
/// is long, and the text comes from users. A formula needs a handful of
/// levels; 32 keep all of it inside an eighth of a worker's stack even in a
/// debug build.
pub const MAX_DEPTH: usize = 32;
/// Most operators accepted: they bound the work, not the depth.
const MAX_OPERATORS: usize = 256;

/// A parsed formula; variables are indices into the names it was parsed with.
#[derive(Clone, Debug, PartialEq)]
pub struct Formula {
    root: Node,
}

#[derive(Clone, Debug, PartialEq)]
enum Node {
    Num(f64),
    Var(usize),
    Neg(Box<Node>),
    Bin(Op, Box<Node>, Box<Node>),
    Call(Func, Vec<Node>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Add,
    Sub,
    Mul,
    Div,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Func {
    Min,
    Max,
    Ceil,
    Floor,
    Round,
    Abs,
    Clamp,
}

const FUNCS: &[(&str, Func)] = &[
    ("min", Func::Min),
    ("max", Func::Max),
    ("ceil", Func::Ceil),
    ("floor", Func::Floor),
    ("round", Func::Round),
    ("abs", Func::Abs),
    ("clamp", Func::Clamp),
];

/// Whether `name` is one of the formula's function names (not usable as a
/// query name).
pub fn is_function(name: &str) -> bool {
    FUNCS.iter().any(|(n, _)| *n == name)
}

/// Whether `name` can be a variable: `[A-Za-z_][A-Za-z0-9_]*`.
pub fn is_identifier(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// A formula that cannot be parsed; the message says where and why.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(String);

/// A formula that cannot be evaluated with these inputs.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum EvalError {
    #[error("division by zero")]
    DivisionByZero,
    #[error("the result of {0} is not a finite number")]
    NonFinite(&'static str),
    #[error("clamp bounds are reversed: lo {lo} > hi {hi}")]
    ClampBounds { lo: f64, hi: f64 },
    #[error("input {0} is not a finite number")]
    BadInput(usize),
}

#[derive(Clone, Debug, PartialEq)]
enum Token {
    Num(f64),
    Ident(String),
    Op(char),
    Open,
    Close,
    Comma,
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Token::Num(v) => write!(f, "{v}"),
            Token::Ident(s) => write!(f, "{s}"),
            Token::Op(c) => write!(f, "{c}"),
            Token::Open => f.write_str("("),
            Token::Close => f.write_str(")"),
            Token::Comma => f.write_str(","),
        }
    }
}

fn lex(src: &str) -> Result<Vec<(usize, Token)>, ParseError> {
    let bytes = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        let start = i;
        match b {
            b' ' | b'\t' | b'\n' | b'\r' => {
                i += 1;
                continue;
            }
            b'+' | b'-' | b'*' | b'/' => {
                out.push((start, Token::Op(b as char)));
                i += 1;
            }
            b'(' => {
                out.push((start, Token::Open));
                i += 1;
            }
            b')' => {
                out.push((start, Token::Close));
                i += 1;
            }
            b',' => {
                out.push((start, Token::Comma));
                i += 1;
            }
            b'0'..=b'9' | b'.' => {
                while i < bytes.len() && (bytes[i].is_ascii_digit() || bytes[i] == b'.') {
                    i += 1;
                }
                if i < bytes.len() && (bytes[i] == b'e' || bytes[i] == b'E') {
                    let mut j = i + 1;
                    if j < bytes.len() && (bytes[j] == b'+' || bytes[j] == b'-') {
                        j += 1;
                    }
                    if j < bytes.len() && bytes[j].is_ascii_digit() {
                        i = j;
                        while i < bytes.len() && bytes[i].is_ascii_digit() {
                            i += 1;
                        }
                    }
                }
                let text = &src[start..i];
                let v: f64 = text
                    .parse()
                    .ok()
                    .filter(|v: &f64| v.is_finite())
                    .ok_or_else(|| {
                        ParseError(format!("at {start}: {text:?} is not a finite number"))
                    })?;
                out.push((start, Token::Num(v)));
            }
            b if b.is_ascii_alphabetic() || b == b'_' => {
                while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                    i += 1;
                }
                out.push((start, Token::Ident(src[start..i].to_owned())));
            }
            _ => {
                let c = src[start..].chars().next().unwrap_or('?');
                return Err(ParseError(format!(
                    "at {start}: unexpected character {c:?}; a formula has numbers, names, + - * /, parentheses and commas"
                )));
            }
        }
    }
    Ok(out)
}

struct Parser<'a> {
    tokens: Vec<(usize, Token)>,
    pos: usize,
    end: usize,
    names: &'a [&'a str],
    depth: usize,
    operators: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos).map(|(_, t)| t)
    }

    fn at(&self) -> usize {
        self.tokens.get(self.pos).map_or(self.end, |(p, _)| *p)
    }

    fn next(&mut self) -> Option<Token> {
        let t = self.tokens.get(self.pos).map(|(_, t)| t.clone());
        self.pos += 1;
        t
    }

    fn error(&self, msg: impl fmt::Display) -> ParseError {
        ParseError(format!("at {}: {msg}", self.at()))
    }

    fn expect(&mut self, want: Token, what: &str) -> Result<(), ParseError> {
        match self.peek() {
            Some(t) if *t == want => {
                self.pos += 1;
                Ok(())
            }
            Some(t) => Err(self.error(format!("expected {what}, found `{t}`"))),
            None => Err(self.error(format!("expected {what}, found the end"))),
        }
    }

    fn enter(&mut self) -> Result<(), ParseError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(self.too_deep());
        }
        Ok(())
    }

    fn too_deep(&self) -> ParseError {
        self.error(format!(
            "nested more than {MAX_DEPTH} levels deep (each bracket, function and operator of a chain is a level)"
        ))
    }

    /// A node over children at most `below` deep, if that is not too deep.
    fn level(&self, node: Node, below: usize) -> Result<(Node, usize), ParseError> {
        if below + 1 > MAX_DEPTH {
            return Err(self.too_deep());
        }
        Ok((node, below + 1))
    }

    fn operator(&mut self) -> Result<(), ParseError> {
        self.operators += 1;
        if self.operators > MAX_OPERATORS {
            return Err(self.error(format!("more than {MAX_OPERATORS} operators")));
        }
        Ok(())
    }

    // Each rule returns its node and the node's depth (a leaf is 1).

    fn expr(&mut self) -> Result<(Node, usize), ParseError> {
        self.enter()?;
        let (mut lhs, mut depth) = self.term()?;
        while let Some(Token::Op(c @ ('+' | '-'))) = self.peek() {
            let op = if *c == '+' { Op::Add } else { Op::Sub };
            self.pos += 1;
            self.operator()?;
            let (rhs, d) = self.term()?;
            (lhs, depth) = self.level(Node::Bin(op, Box::new(lhs), Box::new(rhs)), depth.max(d))?;
        }
        self.depth -= 1;
        Ok((lhs, depth))
    }

    fn term(&mut self) -> Result<(Node, usize), ParseError> {
        let (mut lhs, mut depth) = self.unary()?;
        while let Some(Token::Op(c @ ('*' | '/'))) = self.peek() {
            let op = if *c == '*' { Op::Mul } else { Op::Div };
            self.pos += 1;
            self.operator()?;
            let (rhs, d) = self.unary()?;
            (lhs, depth) = self.level(Node::Bin(op, Box::new(lhs), Box::new(rhs)), depth.max(d))?;
        }
        Ok((lhs, depth))
    }

    fn unary(&mut self) -> Result<(Node, usize), ParseError> {
        if let Some(Token::Op('-')) = self.peek() {
            self.pos += 1;
            self.enter()?;
            let (inner, d) = self.unary()?;
            self.depth -= 1;
            return self.level(Node::Neg(Box::new(inner)), d);
        }
        self.primary()
    }

    fn primary(&mut self) -> Result<(Node, usize), ParseError> {
        let at = self.at();
        match self.next() {
            Some(Token::Num(v)) => Ok((Node::Num(v), 1)),
            Some(Token::Open) => {
                let inner = self.expr()?;
                self.expect(Token::Close, "`)`")?;
                Ok(inner)
            }
            Some(Token::Ident(name)) => {
                if let Some(Token::Open) = self.peek() {
                    self.pos += 1;
                    return self.call(&name, at);
                }
                match self.names.iter().position(|n| *n == name) {
                    Some(i) => Ok((Node::Var(i), 1)),
                    None => Err(self.unknown_name(at, &name)),
                }
            }
            t => Err(unexpected(at, t)),
        }
    }

    fn call(&mut self, name: &str, at: usize) -> Result<(Node, usize), ParseError> {
        let Some(func) = FUNCS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f) else {
            return Err(unknown_function(at, name));
        };
        let (mut args, mut depth) = (Vec::new(), 0);
        if let Some(Token::Close) = self.peek() {
            self.pos += 1;
        } else {
            loop {
                let (arg, d) = self.expr()?;
                args.push(arg);
                depth = depth.max(d);
                match self.next() {
                    Some(Token::Comma) => continue,
                    Some(Token::Close) => break,
                    t => {
                        self.pos -= 1;
                        return Err(self.bad_separator(t));
                    }
                }
            }
        }
        arity(func, args.len()).map_err(|wanted| wrong_arity(at, name, wanted, args.len()))?;
        self.level(Node::Call(func, args), depth)
    }

    // The messages are built out of line (cold), so that the frames of the
    // recursive rules above stay small: they recurse once per bracket.

    #[cold]
    #[inline(never)]
    fn unknown_name(&self, at: usize, name: &str) -> ParseError {
        let known = if self.names.is_empty() {
            "no query names are defined".to_owned()
        } else {
            format!("known names: {}", self.names.join(", "))
        };
        ParseError(format!(
            "at {at}: unknown name `{name}` ({known}; define it with `query.{name}`)"
        ))
    }

    #[cold]
    #[inline(never)]
    fn bad_separator(&self, found: Option<Token>) -> ParseError {
        match found {
            Some(t) => self.error(format!("expected `,` or `)`, found `{t}`")),
            None => self.error("expected `,` or `)`, found the end"),
        }
    }
}

#[cold]
#[inline(never)]
fn unexpected(at: usize, found: Option<Token>) -> ParseError {
    match found {
        Some(t) => ParseError(format!(
            "at {at}: expected a number, a name, a function or `(`, found `{t}`"
        )),
        None => ParseError(format!("at {at}: unexpected end of formula")),
    }
}

/// Whether `func` takes `n` arguments; if not, what it takes.
fn arity(func: Func, n: usize) -> Result<(), &'static str> {
    let (ok, wanted) = match func {
        Func::Min | Func::Max => (n >= 2, "at least 2 arguments"),
        Func::Clamp => (n == 3, "3 arguments (x, lo, hi)"),
        _ => (n == 1, "1 argument"),
    };
    if ok { Ok(()) } else { Err(wanted) }
}

#[cold]
#[inline(never)]
fn wrong_arity(at: usize, name: &str, wanted: &str, got: usize) -> ParseError {
    ParseError(format!("at {at}: `{name}` takes {wanted}, got {got}"))
}

#[cold]
#[inline(never)]
fn unknown_function(at: usize, name: &str) -> ParseError {
    let names: Vec<&str> = FUNCS.iter().map(|(n, _)| *n).collect();
    ParseError(format!(
        "at {at}: unknown function `{name}` (functions: {})",
        names.join(", ")
    ))
}

impl Formula {
    /// Parses `src`; `names` are the variables it may use, in the order their
    /// values will be given to [`Formula::eval`].
    pub fn parse(src: &str, names: &[&str]) -> Result<Self, ParseError> {
        if src.len() > MAX_LEN {
            return Err(ParseError(format!("longer than {MAX_LEN} bytes")));
        }
        let tokens = lex(src)?;
        if tokens.is_empty() {
            return Err(ParseError("empty formula".into()));
        }
        let mut p = Parser {
            tokens,
            pos: 0,
            end: src.len(),
            names,
            depth: 0,
            operators: 0,
        };
        let (root, _) = p.expr()?;
        if let Some(t) = p.peek() {
            return Err(p.error(format!("unexpected `{t}` after a complete expression")));
        }
        Ok(Self { root })
    }

    /// Indices of the variables the formula reads.
    pub fn variables(&self) -> Vec<usize> {
        fn walk(n: &Node, out: &mut Vec<usize>) {
            match n {
                Node::Num(_) => {}
                Node::Var(i) => {
                    if !out.contains(i) {
                        out.push(*i)
                    }
                }
                Node::Neg(a) => walk(a, out),
                Node::Bin(_, a, b) => {
                    walk(a, out);
                    walk(b, out);
                }
                Node::Call(_, args) => args.iter().for_each(|a| walk(a, out)),
            }
        }
        let mut out = Vec::new();
        walk(&self.root, &mut out);
        out
    }

    /// Evaluates with `values[i]` for variable `i`. The result is finite.
    pub fn eval(&self, values: &[f64]) -> Result<f64, EvalError> {
        // `+ 0.0` turns -0 into 0: KEDA should never see a signed zero.
        eval(&self.root, values).map(|v| v + 0.0)
    }
}

fn finite(v: f64, what: &'static str) -> Result<f64, EvalError> {
    if v.is_finite() {
        Ok(v)
    } else {
        Err(EvalError::NonFinite(what))
    }
}

fn eval(n: &Node, values: &[f64]) -> Result<f64, EvalError> {
    match n {
        Node::Num(v) => Ok(*v),
        Node::Var(i) => match values.get(*i) {
            Some(v) if v.is_finite() => Ok(*v),
            _ => Err(EvalError::BadInput(*i)),
        },
        Node::Neg(a) => Ok(-eval(a, values)?),
        Node::Bin(op, a, b) => {
            let (a, b) = (eval(a, values)?, eval(b, values)?);
            match op {
                Op::Add => finite(a + b, "an addition"),
                Op::Sub => finite(a - b, "a subtraction"),
                Op::Mul => finite(a * b, "a multiplication"),
                Op::Div if b == 0.0 => Err(EvalError::DivisionByZero),
                Op::Div => finite(a / b, "a division"),
            }
        }
        Node::Call(f, args) => {
            let mut vs = Vec::with_capacity(args.len());
            for a in args {
                vs.push(eval(a, values)?);
            }
            Ok(match (f, vs.as_slice()) {
                (Func::Min, _) => vs.iter().copied().fold(f64::INFINITY, f64::min),
                (Func::Max, _) => vs.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                (Func::Ceil, [x]) => x.ceil(),
                (Func::Floor, [x]) => x.floor(),
                (Func::Round, [x]) => x.round(),
                (Func::Abs, [x]) => x.abs(),
                (Func::Clamp, [x, lo, hi]) => {
                    if lo > hi {
                        return Err(EvalError::ClampBounds { lo: *lo, hi: *hi });
                    }
                    x.max(*lo).min(*hi)
                }
                // Arity is checked by the parser.
                _ => {
                    return Err(EvalError::NonFinite(
                        "a call with the wrong number of arguments",
                    ));
                }
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn eval_str(src: &str, names: &[&str], values: &[f64]) -> Result<f64, String> {
        Formula::parse(src, names)
            .map_err(|e| e.to_string())?
            .eval(values)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn kafka_lag_example() {
        let names = ["lag", "partitions"];
        let f = "min(ceil(lag / 100), partitions)";
        assert_eq!(eval_str(f, &names, &[250.0, 12.0]), Ok(3.0));
        assert_eq!(eval_str(f, &names, &[5000.0, 12.0]), Ok(12.0));
        assert_eq!(eval_str(f, &names, &[0.0, 12.0]), Ok(0.0));
    }

    #[test]
    fn precedence_associativity_and_functions() {
        let cases: &[(&str, f64)] = &[
            ("1 + 2 * 3", 7.0),
            ("(1 + 2) * 3", 9.0),
            ("10 - 4 - 3", 3.0),
            ("64 / 4 / 2", 8.0),
            ("-2 * -3", 6.0),
            ("- -2", 2.0),
            ("2 - -2", 4.0),
            ("max(1, 5, 3)", 5.0),
            ("min(4, 2.5)", 2.5),
            ("floor(2.7) + ceil(2.1)", 5.0),
            ("round(2.5)", 3.0),
            ("round(-2.5)", -3.0),
            ("abs(-7)", 7.0),
            ("clamp(15, 0, 10)", 10.0),
            ("clamp(-1, 0, 10)", 0.0),
            ("clamp(5, 0, 10)", 5.0),
            ("1.5e2 + .5", 150.5),
            ("-0", 0.0),
        ];
        for (src, want) in cases {
            let got = eval_str(src, &[], &[]).unwrap_or_else(|e| panic!("{src}: {e}"));
            assert_eq!(got, *want, "{src}");
        }
        assert!(eval_str("-0", &[], &[]).unwrap().is_sign_positive());
    }

    #[test]
    fn parse_errors_say_what_and_where() {
        let cases: &[(&str, &[&str])] = &[
            ("", &["empty"]),
            ("lag +", &["end"]),
            ("lag lag", &["unexpected `lag`"]),
            ("nope * 2", &["unknown name `nope`", "lag", "query.nope"]),
            ("sqrt(lag)", &["unknown function `sqrt`", "clamp"]),
            ("min(lag)", &["`min` takes at least 2"]),
            ("clamp(lag, 1)", &["`clamp` takes 3"]),
            ("ceil(lag, 1)", &["`ceil` takes 1"]),
            ("(lag", &["expected `)`"]),
            ("lag)", &["unexpected `)`"]),
            ("lag % 2", &["unexpected character '%'"]),
            ("1e999", &["not a finite number"]),
            ("1..2", &["not a finite number"]),
            ("lag ^ 2", &["'^'"]),
            ("lag × 2", &["'×'"]),
            ("läg", &["'ä'"]),
        ];
        for (src, needles) in cases {
            let e = Formula::parse(src, &["lag"]).unwrap_err().to_string();
            for n in *needles {
                assert!(e.contains(n), "{src:?}: {e:?} should mention {n:?}");
            }
        }
    }

    #[test]
    fn nesting_and_length_are_bounded() {
        let deep = format!("{}1{}", "(".repeat(10_000), ")".repeat(10_000));
        assert!(
            Formula::parse(&deep, &[])
                .unwrap_err()
                .to_string()
                .contains("longer than")
        );
        let deep = format!("{}1{}", "(".repeat(100), ")".repeat(100));
        assert!(
            Formula::parse(&deep, &[])
                .unwrap_err()
                .to_string()
                .contains("nested")
        );
        let negs = format!("{}1", "-".repeat(200));
        assert!(
            Formula::parse(&negs, &[])
                .unwrap_err()
                .to_string()
                .contains("nested")
        );
        let ok = format!("{}1{}", "(".repeat(30), ")".repeat(30));
        assert_eq!(eval_str(&ok, &[], &[]), Ok(1.0));
    }

    #[test]
    fn the_deepest_formulas_fit_a_small_stack() {
        // An eighth of a tokio worker's stack (2 MiB), in a debug build.
        std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(|| {
                let n = MAX_DEPTH - 1;
                let chain = format!("1{}", "+1".repeat(n));
                assert_eq!(eval_str(&chain, &[], &[]), Ok((n + 1) as f64));
                let products = format!("a{}", "*a".repeat(n));
                assert_eq!(eval_str(&products, &["a"], &[1.0]), Ok(1.0));
                let calls = format!("{}1{}", "abs(".repeat(n), ")".repeat(n));
                assert_eq!(eval_str(&calls, &[], &[]), Ok(1.0));
                let negs = format!("{}1", "-".repeat(n));
                assert_eq!(eval_str(&negs, &[], &[]), Ok(-1.0));
                for deeper in [
                    format!("1{}", "+1".repeat(n + 1)),
                    format!("{}1{}", "abs(".repeat(n + 1), ")".repeat(n + 1)),
                    format!("{}1", "-".repeat(n + 1)),
                    format!("1{}", "*-1".repeat(n + 1)),
                ] {
                    let e = eval_str(&deeper, &[], &[]).unwrap_err();
                    assert!(e.contains("32 levels"), "{deeper}: {e}");
                }
                // Wide but shallow.
                let wide = format!("max({})", vec!["1+1"; MAX_OPERATORS + 1].join(","));
                assert!(eval_str(&wide, &[], &[]).unwrap_err().contains("operators"));
            })
            .unwrap()
            .join()
            .expect("no stack overflow");
    }

    #[test]
    fn data_dependent_failures_are_errors_not_numbers() {
        let n = ["a", "b"];
        assert_eq!(
            Formula::parse("a / b", &n).unwrap().eval(&[1.0, 0.0]),
            Err(EvalError::DivisionByZero)
        );
        assert_eq!(
            Formula::parse("a / (b - b)", &n).unwrap().eval(&[0.0, 3.0]),
            Err(EvalError::DivisionByZero)
        );
        assert!(matches!(
            Formula::parse("a * b", &n).unwrap().eval(&[1e300, 1e300]),
            Err(EvalError::NonFinite(_))
        ));
        assert!(matches!(
            Formula::parse("clamp(a, b, 1)", &n)
                .unwrap()
                .eval(&[1.0, 2.0]),
            Err(EvalError::ClampBounds { .. })
        ));
        assert_eq!(
            Formula::parse("a + b", &n).unwrap().eval(&[f64::NAN, 1.0]),
            Err(EvalError::BadInput(0))
        );
    }

    #[test]
    fn variables_lists_what_is_read() {
        let f = Formula::parse("a + min(c, a)", &["a", "b", "c"]).unwrap();
        assert_eq!(f.variables(), vec![0, 2]);
    }

    #[test]
    fn identifiers() {
        assert!(is_identifier("lag") && is_identifier("_x1") && is_identifier("Lag_2"));
        assert!(
            !is_identifier("")
                && !is_identifier("1a")
                && !is_identifier("a-b")
                && !is_identifier("a.b")
        );
        assert!(is_function("clamp") && !is_function("lag"));
    }

    // A reference evaluator over its own tree type, written the obvious way,
    // and a printer that uses as few parentheses as precedence allows: the
    // property is that printing, parsing and evaluating agrees with it.
    #[derive(Clone, Debug)]
    enum R {
        Num(f64),
        Var(usize),
        Neg(Box<R>),
        Bin(char, Box<R>, Box<R>),
        Call(&'static str, Vec<R>),
    }

    fn reference(r: &R, vars: &[f64]) -> Option<f64> {
        let v = match r {
            R::Num(v) => *v,
            R::Var(i) => vars[*i],
            R::Neg(a) => -reference(a, vars)?,
            R::Bin(op, a, b) => {
                let (a, b) = (reference(a, vars)?, reference(b, vars)?);
                match op {
                    '+' => a + b,
                    '-' => a - b,
                    '*' => a * b,
                    _ if b == 0.0 => return None,
                    _ => a / b,
                }
            }
            R::Call(f, args) => {
                let vs: Vec<f64> = args
                    .iter()
                    .map(|a| reference(a, vars))
                    .collect::<Option<_>>()?;
                match *f {
                    "min" => vs.iter().copied().reduce(f64::min)?,
                    "max" => vs.iter().copied().reduce(f64::max)?,
                    "ceil" => vs[0].ceil(),
                    "floor" => vs[0].floor(),
                    "round" => vs[0].round(),
                    "abs" => vs[0].abs(),
                    _ if vs[1] > vs[2] => return None,
                    _ => vs[0].max(vs[1]).min(vs[2]),
                }
            }
        };
        v.is_finite().then_some(v)
    }

    fn prec(r: &R) -> u8 {
        match r {
            R::Bin('+' | '-', ..) => 1,
            R::Bin(..) => 2,
            R::Neg(_) => 3,
            _ => 4,
        }
    }

    fn print(r: &R, names: &[&str]) -> String {
        let wrap = |r: &R, need: bool| {
            let s = print(r, names);
            if need { format!("({s})") } else { s }
        };
        match r {
            R::Num(v) => format!("{v}"),
            R::Var(i) => names[*i].to_string(),
            R::Neg(a) => format!("-{}", wrap(a, prec(a) < 3)),
            R::Bin(op, a, b) => {
                let p = prec(r);
                format!("{} {op} {}", wrap(a, prec(a) < p), wrap(b, prec(b) <= p))
            }
            R::Call(f, args) => {
                let args: Vec<String> = args.iter().map(|a| print(a, names)).collect();
                format!("{f}({})", args.join(", "))
            }
        }
    }

    fn tree() -> impl Strategy<Value = R> {
        let leaf = prop_oneof![
            prop_oneof![
                Just(0.0),
                Just(1.0),
                Just(0.5),
                Just(3.0),
                Just(100.0),
                Just(2.25),
                0.0f64..1e6
            ]
            .prop_map(R::Num),
            (0usize..3).prop_map(R::Var),
        ];
        leaf.prop_recursive(6, 48, 3, |inner| {
            prop_oneof![
                inner.clone().prop_map(|a| R::Neg(Box::new(a))),
                (
                    prop_oneof![Just('+'), Just('-'), Just('*'), Just('/')],
                    inner.clone(),
                    inner.clone()
                )
                    .prop_map(|(op, a, b)| R::Bin(op, Box::new(a), Box::new(b))),
                (
                    prop_oneof![Just("ceil"), Just("floor"), Just("round"), Just("abs")],
                    inner.clone()
                )
                    .prop_map(|(f, a)| R::Call(f, vec![a])),
                (
                    prop_oneof![Just("min"), Just("max")],
                    proptest::collection::vec(inner.clone(), 2..4)
                )
                    .prop_map(|(f, args)| R::Call(f, args)),
                (inner.clone(), inner.clone(), inner)
                    .prop_map(|(x, lo, hi)| R::Call("clamp", vec![x, lo, hi])),
            ]
        })
    }

    proptest! {
        #[test]
        fn evaluator_agrees_with_the_reference(
            r in tree(),
            vars in proptest::collection::vec(prop_oneof![Just(0.0), -1e3f64..1e3, 0.0f64..1e9], 3),
        ) {
            let names = ["lag", "partitions", "x"];
            let src = print(&r, &names);
            let f = Formula::parse(&src, &names).map_err(|e| TestCaseError::fail(format!("{src}: {e}")))?;
            let ours = f.eval(&vars).ok();
            let want = reference(&r, &vars);
            match (ours, want) {
                (Some(a), Some(b)) => prop_assert!(a == b, "{src}: {a} != {b}"),
                (None, None) => {}
                (a, b) => prop_assert!(false, "{src} with {vars:?}: ours {a:?}, reference {b:?}"),
            }
            if let Some(v) = ours {
                prop_assert!(v.is_finite());
            }
        }

        #[test]
        fn fully_parenthesised_form_means_the_same(r in tree()) {
            fn full(r: &R, names: &[&str]) -> String {
                match r {
                    R::Num(v) => format!("{v}"),
                    R::Var(i) => names[*i].to_string(),
                    R::Neg(a) => format!("(-{})", full(a, names)),
                    R::Bin(op, a, b) => format!("({}{op}{})", full(a, names), full(b, names)),
                    R::Call(f, args) => {
                        let a: Vec<String> = args.iter().map(|a| full(a, names)).collect();
                        format!("{f}({})", a.join(","))
                    }
                }
            }
            let names = ["a", "b", "c"];
            let vars = [2.0, 7.0, 0.5];
            let minimal = Formula::parse(&print(&r, &names), &names).unwrap().eval(&vars).ok();
            let full = Formula::parse(&full(&r, &names), &names).unwrap().eval(&vars).ok();
            prop_assert_eq!(minimal, full);
        }

        #[test]
        fn arbitrary_text_never_panics(src in "[-+*/(),. 0-9a-z_eE]{0,80}") {
            if let Ok(f) = Formula::parse(&src, &["a", "b"])
                && let Ok(v) = f.eval(&[1.0, 0.0])
            {
                prop_assert!(v.is_finite());
            }
        }
    }
}
