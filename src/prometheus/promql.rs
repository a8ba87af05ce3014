//! PromQL checks and rewrites, done once when a trigger is parsed.
//!
//! A query is parsed with `promql-parser` (so a typo is refused at once),
//! must yield a scalar or an instant vector, may get extra label matchers (a
//! preset's `selector`) and, with namespace enforcement, gets
//! `namespace="<ScaledObject namespace>"` on every vector and matrix selector,
//! wherever it sits (functions, aggregations, binary operations, subqueries).
//! The rewritten AST is printed back and the printed text is parsed again and
//! compared with the rewritten AST: if the printer ever lost or changed
//! anything, the query is refused instead of being sent in a form we did not
//! check.
//!
//! Depth: `promql-parser`'s parser, its printer, its comparisons and the
//! drop of its AST all recurse, as deep as the tree is, and the text comes
//! from tenants (16,000 unary minus signs overflow any thread's stack and
//! abort the process). So before anything is parsed, `check_tokens` runs
//! the crate's own lexer (the same comments, strings and escapes the parser
//! will see) and bounds, from its tokens alone, how deep the tree can be. It
//! also refuses the numbers the parser would panic on, and a panic of the
//! parser on anything else is caught: a refusal, not an unwinding RPC.

use lrpar::{Lexeme as _, Lexer as _, NonStreamingLexer as _};
use promql_parser::{
    label::{MatchOp, Matcher},
    parser::{
        self, Expr, VectorSelector,
        token::{
            T_ADD, T_COLON, T_COMMA, T_LEFT_BRACE, T_LEFT_BRACKET, T_LEFT_PAREN, T_NUMBER,
            T_OFFSET, T_RIGHT_BRACE, T_RIGHT_PAREN, T_SUB, TokenId, TokenType,
        },
        value::ValueType,
    },
};

/// Longest query accepted, in bytes.
const MAX_LEN: usize = 16 * 1024;
/// Deepest syntax tree accepted. Each bracket pair and each operator of a
/// chain (`a + b + c` is two levels: `(a + b) + c`) can add a level; a
/// trigger's query needs a handful, and 64 levels keep every recursive walk
/// of the tree (ours and `promql-parser`'s) far inside a worker's stack.
pub const MAX_DEPTH: usize = 64;
/// Most operators accepted in a whole query: they bound the work and the
/// size of the rewrite, not the depth.
const MAX_OPERATORS: usize = 500;

/// The label namespace enforcement pins.
pub const NAMESPACE_LABEL: &str = "namespace";

/// Name used to parse a bare label selector (`selector` of presets).
const PROBE_NAME: &str = "__activescale_selector__";

/// What to do to a query before it is sent.
#[derive(Clone, Copy, Debug, Default)]
pub struct Rewrite<'a> {
    /// Matchers added to every selector.
    pub extra: &'a [Matcher],
    /// With enforcement: the only namespace the query may read.
    pub namespace: Option<&'a str>,
}

/// Checks `text`, applies `rewrite` and returns the query to send.
pub fn prepare(text: &str, rewrite: Rewrite<'_>) -> Result<String, String> {
    let mut expr = parse_bounded(text, MAX_LEN)?;
    match expr.value_type() {
        ValueType::Scalar | ValueType::Vector => {}
        other => {
            return Err(format!(
                "it yields a {other}; a query must yield a scalar or an instant vector (aggregate it, e.g. sum(...))"
            ));
        }
    }
    walk(&mut expr, &mut |v| {
        match v {
        Visit::Function(name) if rewrite.namespace.is_some() && name == "info" => Err(
            "`info()` reads series the query does not name, so namespace enforcement cannot cover it".into(),
        ),
        Visit::Function(_) => Ok(()),
        Visit::Selector(vs) => {
            for group in groups(vs) {
                group.extend(rewrite.extra.iter().cloned());
            }
            match rewrite.namespace {
                Some(ns) => pin_namespace(vs, ns),
                None => Ok(()),
            }
        }
    }
    })?;
    let printed = expr.to_string();
    // Added matchers make the text longer than the original, never deeper;
    // the depth is bounded again all the same: the printer is not ours.
    let reparsed = parse_bounded(&printed, usize::MAX).map_err(|e| {
        format!("its rewritten form {printed:?} does not parse ({e}); please report this")
    })?;
    if canonical(reparsed) != canonical(expr) {
        return Err(format!(
            "its rewritten form {printed:?} would not mean the same query; please report this"
        ));
    }
    Ok(printed)
}

/// Parses a label selector such as `namespace="membrane",app="worker"`.
pub fn parse_selector(text: &str) -> Result<Vec<Matcher>, String> {
    let expr = parse_bounded(&format!("{PROBE_NAME}{{{text}}}"), MAX_LEN)?;
    match expr {
        Expr::VectorSelector(vs)
            if vs.name.as_deref() == Some(PROBE_NAME)
                && vs.offset.is_none()
                && vs.at.is_none()
                && vs.matchers.or_matchers.is_empty()
                && !vs.matchers.matchers.is_empty() =>
        {
            if let Some(m) = vs.matchers.matchers.iter().find(|m| m.name == "__name__") {
                return Err(format!(
                    "it names a metric ({m}); a selector only filters labels"
                ));
            }
            Ok(vs.matchers.matchers)
        }
        _ => Err("expected label matchers such as namespace=\"membrane\",app=\"worker\"".into()),
    }
}

fn parse_bounded(text: &str, max_len: usize) -> Result<Expr, String> {
    if text.len() > max_len {
        return Err(format!("it is longer than {max_len} bytes"));
    }
    if check_tokens(text)? > MAX_DEPTH {
        return Err(too_deep());
    }
    match std::panic::catch_unwind(|| parser::parse(text)) {
        Ok(parsed) => parsed.map_err(|e| format!("it is not valid PromQL: {e}")),
        Err(_) => Err("the PromQL parser failed on it; please report this".into()),
    }
}

/// How deep the tree of `text` can be, read before parsing; refuses more
/// than [`MAX_OPERATORS`] operators, stops early past [`MAX_DEPTH`], and
/// refuses a duration written as a number that is not one (see
/// [`not_a_duration`]).
///
/// The tokens are `promql-parser`'s own, so a comment or a string hides
/// nothing from this count that it would not hide from the parser. Every node
/// of the tree above a leaf comes from a distinct token: a bracket pair
/// (call, aggregation, parentheses), an operator (binary or unary) or a `[`
/// (range, subquery). A node inside a bracket pair lies below at most that
/// pair and the operators of the same argument around it, so the tree is no
/// deeper than the deepest path of (1 + operators of an argument + the
/// deepest pair inside that argument). The count runs over a stack of open
/// pairs (no recursion) and over-estimates (grouping lists such as
/// `by (a)` count as a level), which is all a bound has to do.
fn check_tokens(text: &str) -> Result<usize, String> {
    let lexer = parser::lexer(text).map_err(|e| format!("it is not valid PromQL: {e}"))?;
    // Open bracket pairs, outermost (the whole query) first.
    let mut open = vec![Level::default()];
    let (mut braces, mut operators) = (0usize, 0usize);
    // The two tokens before this one, outside label braces.
    let mut before: [TokenId; 2] = [T_COMMA; 2];
    for lexeme in lexer.iter() {
        let lexeme = lexeme.map_err(|e| format!("it is not valid PromQL: {e:?}"))?;
        let id = lexeme.tok_id();
        if id == T_NUMBER && braces == 0 && duration_position(before) {
            let number = lexer.span_str(lexeme.span());
            if not_a_duration(number) {
                return Err(format!(
                    "{number} is not a duration (a number of seconds, finite and below 2^64)"
                ));
            }
        }
        if braces == 0 && id != T_LEFT_BRACE {
            before = [before[1], id];
        }
        // Label matchers (`{a="b" or c!="d"}`) are one leaf whatever they hold.
        match id {
            T_LEFT_BRACE => braces += 1,
            T_RIGHT_BRACE => braces = braces.saturating_sub(1),
            _ if braces > 0 => {}
            T_LEFT_PAREN => {
                if open.len() > MAX_DEPTH {
                    return Err(too_deep());
                }
                open.push(Level::default());
            }
            T_RIGHT_PAREN => {
                // The lexer refuses an unbalanced `)`; the root stays.
                if open.len() > 1
                    && let Some(inner) = open.pop()
                    && let Some(outer) = open.last_mut()
                {
                    outer.below = outer.below.max(1 + inner.depth());
                }
            }
            T_COMMA => {
                if let Some(level) = open.last_mut() {
                    level.next_argument();
                }
            }
            _ if id == T_LEFT_BRACKET || TokenType::new(id).is_operator() => {
                operators += 1;
                if operators > MAX_OPERATORS {
                    return Err(format!("it has more than {MAX_OPERATORS} operators"));
                }
                if let Some(level) = open.last_mut() {
                    level.operators += 1;
                    // A chain this long is too deep already: stop reading.
                    if level.operators > MAX_DEPTH {
                        return Err(too_deep());
                    }
                }
            }
            _ => {}
        }
    }
    // The lexer refuses unclosed brackets, so only the root is left; any
    // other is closed here all the same, innermost first.
    let depth = open
        .iter()
        .rev()
        .fold(None, |inner: Option<usize>, level| {
            let below = level.below.max(inner.map_or(0, |d| 1 + d));
            Some((level.operators + below).max(level.done))
        })
        .unwrap_or(0);
    Ok(depth)
}

/// Whether a number after `before` is read as a duration: `[n]`, `[5m:n]`,
/// `offset n`, `offset -n`.
fn duration_position(before: [TokenId; 2]) -> bool {
    matches!(
        before,
        [_, T_LEFT_BRACKET | T_COLON | T_OFFSET] | [T_OFFSET, T_SUB | T_ADD]
    )
}

/// `promql-parser` turns a number in a duration's place into a `Duration`
/// with a conversion that panics on NaN, infinities and more than 2^64
/// seconds (`x offset 1e30`, `x[Inf]`).
fn not_a_duration(number: &str) -> bool {
    promql_parser::util::parse_str_radix(number)
        .is_ok_and(|v| std::time::Duration::try_from_secs_f64(v).is_err())
}

fn too_deep() -> String {
    format!(
        "it nests more than {MAX_DEPTH} levels deep (each bracket pair and each operator of a chain is a level: \
         `sum(a + b + c)` is 3)"
    )
}

/// One open bracket pair of [`check_tokens`]: the argument being read, and the
/// deepest finished one.
#[derive(Default)]
struct Level {
    /// Operators of the current argument.
    operators: usize,
    /// Deepest bracket pair of the current argument.
    below: usize,
    /// Deepest finished argument.
    done: usize,
}

impl Level {
    fn depth(&self) -> usize {
        (self.operators + self.below).max(self.done)
    }

    fn next_argument(&mut self) {
        self.done = self.depth();
        self.operators = 0;
        self.below = 0;
    }
}

/// With enforcement, a selector may name only its own namespace: a matcher
/// on `namespace` that cannot match it is refused (the query asks for another
/// tenant's data); otherwise `namespace="<ns>"` is added.
fn pin_namespace(vs: &mut VectorSelector, ns: &str) -> Result<(), String> {
    let shown = vs.to_string();
    for group in groups(vs) {
        if let Some(m) = group
            .iter()
            .find(|m| m.name == NAMESPACE_LABEL && !m.is_match(ns))
        {
            return Err(format!(
                "selector `{shown}` reads another namespace ({m}); this ScaledObject may read only namespace {ns:?} \
                 (the operator can turn off prometheus_enforce_namespace)"
            ));
        }
        let pinned = group
            .iter()
            .any(|m| m.name == NAMESPACE_LABEL && m.op == MatchOp::Equal && m.value == ns);
        if !pinned {
            group.push(Matcher::new(MatchOp::Equal, NAMESPACE_LABEL, ns));
        }
    }
    Ok(())
}

/// The AND-groups of a selector: its matchers, or each `or` alternative.
fn groups(vs: &mut VectorSelector) -> Vec<&mut Vec<Matcher>> {
    let m = &mut vs.matchers;
    if m.or_matchers.is_empty() {
        vec![&mut m.matchers]
    } else {
        let mut out: Vec<&mut Vec<Matcher>> = m.or_matchers.iter_mut().collect();
        if !m.matchers.is_empty() {
            out.push(&mut m.matchers);
        }
        out
    }
}

enum Visit<'a> {
    Selector(&'a mut VectorSelector),
    Function(&'static str),
}

/// Calls `f` on every selector and function call of `root`, in source
/// order. A stack instead of recursion: depth is bounded by [`check_tokens`], but a
/// walk of ours should not depend on that.
fn walk(root: &mut Expr, f: &mut dyn FnMut(Visit<'_>) -> Result<(), String>) -> Result<(), String> {
    let mut todo = vec![root];
    while let Some(e) = todo.pop() {
        // Children go on the stack last-first, so they come off first-first.
        match e {
            Expr::Aggregate(a) => {
                todo.push(&mut a.expr);
                if let Some(p) = a.param.as_mut() {
                    todo.push(p);
                }
            }
            Expr::Unary(u) => todo.push(&mut u.expr),
            Expr::Binary(b) => {
                todo.push(&mut b.rhs);
                todo.push(&mut b.lhs);
            }
            Expr::Paren(p) => todo.push(&mut p.expr),
            Expr::Subquery(s) => todo.push(&mut s.expr),
            Expr::NumberLiteral(_) | Expr::StringLiteral(_) => {}
            Expr::VectorSelector(vs) => f(Visit::Selector(vs))?,
            Expr::MatrixSelector(ms) => f(Visit::Selector(&mut ms.vs))?,
            Expr::Call(c) => {
                f(Visit::Function(c.func.name))?;
                todo.extend(c.args.args.iter_mut().rev().map(|a| &mut **a));
            }
            Expr::Extension(_) => {
                return Err("it contains an expression this service cannot check".into());
            }
        }
    }
    Ok(())
}

/// `e` with every matcher group sorted: the printer sorts matchers, and
/// their order does not change what a selector means.
fn canonical(mut e: Expr) -> Expr {
    let _ = walk(&mut e, &mut |v| {
        if let Visit::Selector(vs) = v {
            for g in groups(vs) {
                g.sort_by(|a, b| {
                    (&a.name, a.op.to_string(), &a.value).cmp(&(
                        &b.name,
                        b.op.to_string(),
                        &b.value,
                    ))
                });
            }
        }
        Ok(())
    });
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(q: &str) -> Result<String, String> {
        prepare(
            q,
            Rewrite {
                extra: &[],
                namespace: Some("shop"),
            },
        )
    }

    /// Every selector of the rewritten query carries `namespace="shop"`.
    fn all_pinned(q: &str) -> bool {
        let mut e = parser::parse(q).unwrap();
        let mut ok = true;
        let mut count = 0;
        walk(&mut e, &mut |v| {
            if let Visit::Selector(vs) = v {
                count += 1;
                for g in groups(vs) {
                    ok &= g.iter().any(|m| {
                        m.name == "namespace" && m.op == MatchOp::Equal && m.value == "shop"
                    });
                }
            }
            Ok(())
        })
        .unwrap();
        ok && count > 0
    }

    #[test]
    fn namespace_is_injected_everywhere() {
        let queries = [
            "up",
            "sum(rate(http_requests_total{job=\"api\"}[5m]))",
            "sum(a) + sum(b)",
            "max_over_time(sum(rate(x[1m]))[10m:1m])",
            "histogram_quantile(0.9, sum by (le) (rate(h_bucket[5m])))",
            "sum(a) / on() group_left sum(b)",
            "count_values(\"v\", x)",
            "topk(1, x) or vector(0)",
            "label_replace(x, \"dst\", \"$1\", \"src\", \"(.*)\")",
            "absent(x{job=\"y\"})",
            "sum(x offset 5m)",
            "quantile(scalar(y), x)",
            "sum(x{namespace=\"shop\"})",
            "-sum(x)",
            "(sum(x))",
            "sum(x @ end())",
        ];
        for q in queries {
            let out = ns(q).unwrap_or_else(|e| panic!("{q}: {e}"));
            assert!(all_pinned(&out), "{q} -> {out}");
        }
        assert_eq!(ns("up").unwrap(), "up{namespace=\"shop\"}");
        assert_eq!(
            ns("sum(x{namespace=\"shop\"})")
                .unwrap()
                .matches("namespace")
                .count(),
            1,
            "an own-namespace matcher is not doubled"
        );
    }

    #[test]
    fn scalar_queries_need_no_selector() {
        assert_eq!(ns("1 + 2").unwrap(), "1 + 2");
        assert_eq!(ns("vector(3)").unwrap(), "vector(3)");
    }

    #[test]
    fn other_namespaces_are_refused() {
        for q in [
            "x{namespace=\"other\"}",
            "sum(x) + sum(y{namespace=\"other\"})",
            "rate(x{namespace=~\"oth.*\"}[5m])",
            "max_over_time(x{namespace!=\"shop\"}[5m:1m])",
            "x{namespace=\"\"}",
        ] {
            let e = ns(q).unwrap_err();
            assert!(
                e.contains("another namespace") && e.contains("shop"),
                "{q}: {e}"
            );
        }
        // Matchers that admit the own namespace only narrow to it.
        let out = ns("x{namespace=~\"sh.*\"}").unwrap();
        assert!(all_pinned(&out), "{out}");
    }

    #[test]
    fn without_enforcement_queries_pass_unchanged_in_meaning() {
        let out = prepare("sum(x{namespace=\"other\"})", Rewrite::default()).unwrap();
        assert_eq!(out, "sum(x{namespace=\"other\"})");
    }

    #[test]
    fn bad_queries_are_refused_with_a_reason() {
        let cases = [
            ("sum(rate(x[5m])", "not valid PromQL"),
            ("sum(x) +", "not valid PromQL"),
            ("x[5m]", "matrix"),
            ("\"text\"", "string"),
            ("nosuchfunc(x)", "not valid PromQL"),
        ];
        for (q, needle) in cases {
            let e = prepare(q, Rewrite::default()).unwrap_err();
            assert!(e.contains(needle), "{q}: {e}");
        }
        let deep = format!("{}1{}", "(".repeat(100), ")".repeat(100));
        assert!(
            prepare(&deep, Rewrite::default())
                .unwrap_err()
                .contains("nests")
        );
        let long = format!("x{}", " + x".repeat(5000));
        assert!(
            prepare(&long, Rewrite::default())
                .unwrap_err()
                .contains("longer")
        );
        assert!(ns("info(x)").unwrap_err().contains("info"));
    }

    #[test]
    fn extra_matchers_reach_every_selector() {
        let extra = parse_selector("team=\"membrane\", tier!=\"dev\"").unwrap();
        let out = prepare(
            "sum(a) + max(b)",
            Rewrite {
                extra: &extra,
                namespace: Some("shop"),
            },
        )
        .unwrap();
        assert_eq!(
            out,
            "sum(a{namespace=\"shop\",team=\"membrane\",tier!=\"dev\"}) + max(b{namespace=\"shop\",team=\"membrane\",tier!=\"dev\"})"
        );
    }

    #[test]
    fn selectors_cannot_smuggle_expressions() {
        for bad in [
            "a=\"1\"}) or vector(100) or sum(x{b=\"2\"",
            "",
            "__name__=\"x\"",
            "a=\"1\"} offset 5m",
            "a",
        ] {
            assert!(parse_selector(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn strings_and_regexes_survive_the_round_trip() {
        let q = r#"sum(x{path=~"/a\\.b|\"q\"", msg!="tab\there"})"#;
        let out = ns(q).unwrap();
        let mut a = parser::parse(&out).unwrap();
        let mut seen = Vec::new();
        walk(&mut a, &mut |v| {
            if let Visit::Selector(vs) = v {
                for g in groups(vs) {
                    seen.extend(g.iter().map(|m| m.value.clone()));
                }
            }
            Ok(())
        })
        .unwrap();
        assert!(seen.contains(&"/a\\.b|\"q\"".to_string()), "{seen:?}");
        assert!(seen.contains(&"tab\there".to_string()), "{seen:?}");
    }

    #[test]
    fn the_check_tokens_counts_what_the_parser_sees() {
        let d = |q: &str| check_tokens(q).unwrap_or_else(|e| panic!("{q}: {e}"));
        assert_eq!(d("up"), 0);
        assert_eq!(d("sum(a + b + c)"), 3);
        assert_eq!(d("sum(a) + sum(b)"), 2);
        assert_eq!(d("((a))"), 2);
        assert_eq!(d("-x"), 1);
        assert_eq!(d("max_over_time(x[5m:1m])"), 2);
        // Arguments are alternatives, not a chain.
        assert_eq!(d("clamp(a + b, -1, 1)"), 2);
        // Operators, brackets and comments inside strings and label braces
        // are not the tree's.
        assert_eq!(
            d("sum(x{a=\"((((+-\", b!=\"c\" or d=\"e\"}) + 1 or vector(2)"),
            3
        );
        assert_eq!(d("x{a=\"# (((\"}"), 0);
        assert_eq!(d("x{a='\\'((('}"), 0);
        // A comment hides to the end of the line, no further.
        assert_eq!(d("# \"\n-(-up)"), 3);
        assert_eq!(d("# ((((\nup"), 0);
    }

    #[test]
    fn numbers_the_parser_cannot_take_as_durations_are_refused() {
        for q in [
            "x offset NaN",
            "x offset Inf",
            "x offset -1e30",
            "x offset +nan",
            "x[1e30]",
            "x[1e400]",
            "max_over_time(x[5m:1e300])",
            "max_over_time(x[1e999:1m])",
        ] {
            let e = prepare(q, Rewrite::default()).unwrap_err();
            assert!(e.contains("is not a duration"), "{q}: {e}");
        }
        // Numbers elsewhere, and durations that are numbers, are fine.
        for q in [
            "x offset 60",
            "rate(x[300])",
            "x > Inf",
            "x{a=\"Inf\"} offset 1",
            "vector(NaN)",
        ] {
            assert!(prepare(q, Rewrite::default()).is_ok(), "{q}");
        }
    }

    #[test]
    fn depth_hidden_behind_comments_and_strings_is_refused() {
        let cases = [
            format!("# \"\n{}up", "-".repeat(16_000)),
            format!("# \"\n{}up{}", "(".repeat(8_000), ")".repeat(8_000)),
            format!("# '\n{}up", "-".repeat(200)),
            format!("# `\n{}up", "- ".repeat(200)),
            format!("x{{a=\"\\\"\"}} + {}up", "-".repeat(200)),
            format!("{}up{}", "(".repeat(100), ")".repeat(100)),
        ];
        // The refusal comes before the parser: on a small stack, no overflow.
        std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(move || {
                for q in &cases {
                    let e = prepare(q, Rewrite::default()).unwrap_err();
                    assert!(e.contains("64 levels"), "{}: {e}", &q[..20]);
                }
            })
            .unwrap()
            .join()
            .expect("no stack overflow");
    }

    #[test]
    fn the_deepest_accepted_queries_fit_a_small_stack() {
        let n = MAX_DEPTH;
        let deepest = [
            format!("x{}", " + x".repeat(n)),
            format!("x{}", " or x".repeat(n)),
            format!("x{}", " ^ x".repeat(n)),
            format!("{}x", "-".repeat(n)),
            format!("{}x{}", "(".repeat(n), ")".repeat(n)),
            format!("{}x{}", "abs(".repeat(n), ")".repeat(n)),
            format!("{}x{}", "-(".repeat(n / 2), ")".repeat(n / 2)),
        ];
        let too_deep = [
            format!("x{}", " + x".repeat(n + 1)),
            format!("{}x", "-".repeat(n + 1)),
            format!("{}x{}", "(".repeat(n + 1), ")".repeat(n + 1)),
        ];
        // An eighth of a tokio worker's stack (2 MiB), in a debug build.
        std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(move || {
                for q in &deepest {
                    let out = ns(q).unwrap_or_else(|e| panic!("{q}: {e}"));
                    assert!(all_pinned(&out), "{out}");
                }
                for q in &too_deep {
                    assert!(ns(q).unwrap_err().contains("levels deep"), "{q}");
                }
            })
            .unwrap()
            .join()
            .expect("no stack overflow");
        // Wide but shallow: a balanced tree of 511 additions is 18 deep.
        let mut wide = "x".to_owned();
        for _ in 0..9 {
            wide = format!("({wide} + {wide})");
        }
        assert!(ns(&wide).unwrap_err().contains("500 operators"), "{wide}");
    }
}
