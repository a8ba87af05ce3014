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

use promql_parser::{
    label::{MatchOp, Matcher},
    parser::{self, Expr, VectorSelector, value::ValueType},
};

/// Longest query accepted, in bytes.
const MAX_LEN: usize = 16 * 1024;
/// Deepest bracket nesting accepted, and most operators: printing, rewriting
/// and dropping the AST all recurse, a chain of operators nests as deep as it
/// is long, and the text comes from users.
const MAX_DEPTH: usize = 64;
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
    let mut expr = parse_bounded(text)?;
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
    let reparsed = parser::parse(&printed).map_err(|e| {
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
    let expr = parse_bounded(&format!("{PROBE_NAME}{{{text}}}"))?;
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

fn parse_bounded(text: &str) -> Result<Expr, String> {
    if text.len() > MAX_LEN {
        return Err(format!("it is longer than {MAX_LEN} bytes"));
    }
    let shape = shape(text);
    if shape.depth > MAX_DEPTH {
        return Err(format!("it nests brackets more than {MAX_DEPTH} deep"));
    }
    if shape.operators > MAX_OPERATORS {
        return Err(format!("it has more than {MAX_OPERATORS} operators"));
    }
    parser::parse(text).map_err(|e| format!("it is not valid PromQL: {e}"))
}

/// Bounds on how deep a query's AST can be, read from the text.
struct Shape {
    /// Deepest `(`/`[`/`{` nesting outside string literals.
    depth: usize,
    /// Operator characters and set-operator words outside strings and label
    /// braces. Over-estimates are fine: this only bounds recursion.
    operators: usize,
}

fn shape(text: &str) -> Shape {
    let (mut depth, mut max, mut operators) = (0usize, 0usize, 0usize);
    let (mut quote, mut escaped, mut braces) = (None, false, 0usize);
    let mut word = String::new();
    let end_word = |word: &mut String, braces: usize, operators: &mut usize| {
        if braces == 0
            && ["and", "or", "unless", "atan2"]
                .iter()
                .any(|w| w.eq_ignore_ascii_case(word))
        {
            *operators += 1;
        }
        word.clear();
    };
    for c in text.chars() {
        if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if c == '\\' && q != '`' {
                escaped = true;
            } else if c == q {
                quote = None;
            }
            continue;
        }
        if c.is_ascii_alphanumeric() || c == '_' {
            word.push(c);
            continue;
        }
        end_word(&mut word, braces, &mut operators);
        match c {
            '"' | '\'' | '`' => quote = Some(c),
            '(' | '[' | '{' => {
                depth += 1;
                max = max.max(depth);
                braces += usize::from(c == '{');
            }
            ')' | ']' | '}' => {
                depth = depth.saturating_sub(1);
                braces = braces.saturating_sub(usize::from(c == '}'));
            }
            '+' | '-' | '*' | '/' | '%' | '^' | '<' | '>' | '=' | '!' if braces == 0 => {
                operators += 1
            }
            _ => {}
        }
    }
    end_word(&mut word, braces, &mut operators);
    Shape {
        depth: max,
        operators,
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

/// Calls `f` on every selector and function call of `e`.
fn walk(e: &mut Expr, f: &mut dyn FnMut(Visit<'_>) -> Result<(), String>) -> Result<(), String> {
    match e {
        Expr::Aggregate(a) => {
            if let Some(p) = a.param.as_mut() {
                walk(p, f)?;
            }
            walk(&mut a.expr, f)
        }
        Expr::Unary(u) => walk(&mut u.expr, f),
        Expr::Binary(b) => {
            walk(&mut b.lhs, f)?;
            walk(&mut b.rhs, f)
        }
        Expr::Paren(p) => walk(&mut p.expr, f),
        Expr::Subquery(s) => walk(&mut s.expr, f),
        Expr::NumberLiteral(_) | Expr::StringLiteral(_) => Ok(()),
        Expr::VectorSelector(vs) => f(Visit::Selector(vs)),
        Expr::MatrixSelector(ms) => f(Visit::Selector(&mut ms.vs)),
        Expr::Call(c) => {
            f(Visit::Function(c.func.name))?;
            for a in c.args.args.iter_mut() {
                walk(a, f)?;
            }
            Ok(())
        }
        Expr::Extension(_) => Err("it contains an expression this service cannot check".into()),
    }
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
    fn long_operator_chains_do_not_exhaust_the_stack() {
        // Runs on a thread with a tokio worker's default stack (2 MiB).
        let worst = [
            format!("x{}", " + x".repeat(MAX_OPERATORS)),
            format!("x{}", " or x".repeat(MAX_OPERATORS)),
            format!("{}x", "-".repeat(MAX_OPERATORS)),
            format!("{}1", "- ".repeat(MAX_OPERATORS)),
            format!("x{}", " + x".repeat((MAX_LEN - 1) / 4)),
        ];
        std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || {
                let results: Vec<_> = worst
                    .iter()
                    .map(|q| {
                        prepare(
                            q,
                            Rewrite {
                                extra: &[],
                                namespace: Some("shop"),
                            },
                        )
                    })
                    .collect();
                assert!(
                    results[..4].iter().all(Result::is_ok),
                    "{:?}",
                    results.iter().map(|r| r.as_ref().err()).collect::<Vec<_>>()
                );
                assert!(results[4].as_ref().unwrap_err().contains("operators"));
            })
            .unwrap()
            .join()
            .expect("no stack overflow");
    }

    #[test]
    fn shape_ignores_strings_and_label_braces() {
        let s = shape("sum(x{a=\"((((+-\", b!=\"c\" or d=\"e\"}) + 1 or vector(2)");
        assert_eq!((s.depth, s.operators), (2, 2));
        assert_eq!(shape("((a))").depth, 2);
        assert_eq!(shape("a and b unless c / 2").operators, 3);
    }
}
