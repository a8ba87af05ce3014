//! Fuzzing the four parsers hostile input reaches: the sink's wire reader
//! (any meshed pod), the PromQL guard and rewriter, the formula parser and
//! the label-selector parser (any tenant's trigger metadata).
//!
//! Each target runs for a time budget, `FUZZ_SECONDS` (default 2, which is
//! what `scripts/test` and CI spend), over inputs from proptest strategies
//! built to hurt: random bytes, token soups with comments and strings with
//! escapes, structured inputs nested past every limit, runs thousands of
//! tokens long. Every input runs on a thread with a 256 KiB stack (an eighth
//! of a tokio worker's): an overflow there means depth is not bounded, and
//! aborts the test binary, which fails. Each input must be answered within
//! [`PER_INPUT`] (a bound against hangs and blow-ups, not a speed goal), must
//! not panic, and must satisfy the target's invariants.
//!
//! Longer runs by hand, e.g. ten minutes per target, with a fixed seed:
//!
//! ```text
//! FUZZ_SECONDS=600 FUZZ_SEED=42 cargo test --test fuzz -- --nocapture --test-threads 1
//! ```
//!
//! A failure prints the seed and where the whole input was written.

// The harness hands every check a `&T`, strings included.
#![allow(clippy::ptr_arg)]

use std::{
    fmt::Debug,
    sync::mpsc,
    time::{Duration, Instant},
};

use activescale::{
    prometheus::{
        formula::Formula,
        promql::{self, Rewrite},
    },
    selector::{Labels, Selector},
    sink::{names::NameFilter, wire},
};
use envoy_types::pb::io::prometheus::client::{Gauge, Metric, MetricFamily, Untyped};
use promql_parser::{
    label::MatchOp,
    parser::{Expr, VectorSelector},
};
use proptest::{
    prelude::*,
    strategy::ValueTree,
    test_runner::{Config, RngAlgorithm, TestRng, TestRunner},
};
use prost::Message;

/// Stack of the thread every input runs on.
const STACK: usize = 256 << 10;
/// Longest any one input may take (debug build, a loaded 2-core machine).
const PER_INPUT: Duration = Duration::from_secs(10);

fn budget() -> Duration {
    let secs = std::env::var("FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .unwrap_or(2.0);
    Duration::from_secs_f64(secs)
}

fn seed() -> u64 {
    std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        })
}

/// What a target's check says about one input.
type Verdict = Result<bool, String>;

/// Runs `check` over inputs drawn from `strategy` until the budget is spent;
/// `check` says whether the input was accepted, or what invariant broke.
fn fuzz<T, S>(name: &str, strategy: S, size: fn(&T) -> usize, check: fn(&T) -> Verdict)
where
    T: Debug + Clone + Send + 'static,
    S: Strategy<Value = T>,
{
    let seed = seed();
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &bytes),
    );

    let (to_worker, inputs) = mpsc::channel::<T>();
    let (to_main, verdicts) = mpsc::channel::<Verdict>();
    let worker = std::thread::Builder::new()
        .name(format!("fuzz-{name}"))
        .stack_size(STACK)
        .spawn(move || {
            for input in inputs {
                if to_main.send(check(&input)).is_err() {
                    return;
                }
            }
        })
        .expect("worker thread");

    // The whole input goes to a file; the message shows its start.
    let report = |input: &T, why: &str| -> String {
        let path = std::env::temp_dir().join(format!("activescale-fuzz-{name}-{seed}.txt"));
        let _ = std::fs::write(&path, format!("{input:?}\n"));
        let shown: String = format!("{input:?}").chars().take(400).collect();
        format!(
            "fuzz {name}: {why}\n  seed {seed} (rerun with FUZZ_SEED={seed})\n  input ({} in all, whole in {}): {shown}",
            size(input),
            path.display()
        )
    };

    // Printed first: a stack overflow aborts before any report, and the
    // seed replays the same inputs.
    eprintln!(
        "fuzz {name}: seed {seed} (an abort below means unbounded depth; FUZZ_SEED={seed} replays it)"
    );
    let (budget, start) = (budget(), Instant::now());
    let (mut runs, mut accepted, mut largest, mut slowest) = (0u64, 0u64, 0usize, Duration::ZERO);
    while start.elapsed() < budget || runs == 0 {
        let input = match strategy.new_tree(&mut runner) {
            Ok(tree) => tree.current(),
            Err(e) => panic!("fuzz {name}: generating an input: {e}"),
        };
        let t = Instant::now();
        if to_worker.send(input.clone()).is_err() {
            panic!("{}", report(&input, "the worker is gone"));
        }
        match verdicts.recv_timeout(PER_INPUT) {
            Ok(Ok(ok)) => accepted += u64::from(ok),
            Ok(Err(why)) => panic!("{}", report(&input, &why)),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!(
                    "{}",
                    report(&input, &format!("no answer within {PER_INPUT:?}"))
                )
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                panic!("{}", report(&input, "it panicked (see above)"))
            }
        }
        slowest = slowest.max(t.elapsed());
        largest = largest.max(size(&input));
        runs += 1;
    }
    drop(to_worker);
    let _ = worker.join();
    eprintln!(
        "fuzz {name}: {runs} inputs in {:.1?} ({accepted} accepted), largest {largest}, slowest {slowest:.1?}, seed {seed}",
        start.elapsed()
    );
}

fn text_len(s: &String) -> usize {
    s.len()
}

/// A small, fast random source (SplitMix64) that expands a drawn seed into a
/// large input: proptest draws the seed and the size, this draws the rest.
/// (Proptest trees of thousands of elements cost far more to build than the
/// parsers take to run; shrinking, their advantage, matters less here than
/// the number of inputs, and a failure names its seed.)
struct Mix(u64);

impl Mix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn pick<'a, T>(&mut self, from: &'a [T]) -> &'a T {
        &from[self.below(from.len())]
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
}

/// A seed and a size up to `max`, often small, sometimes near `max`.
fn seeded(max: usize) -> impl Strategy<Value = (u64, usize)> {
    (any::<u64>(), prop_oneof![2 => 0..max.min(64), 1 => 0..max])
}

/// Random bytes as text: what arrives when the input is not even UTF-8.
fn garbage(max: usize) -> impl Strategy<Value = String> {
    seeded(max).prop_map(|(seed, n)| {
        let mut r = Mix(seed);
        let ascii = r.chance(50);
        let bytes: Vec<u8> = (0..n)
            .map(|_| {
                let b = r.next() as u8;
                if ascii { b & 0x7f } else { b }
            })
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// Tokens from `table` (or, one time in five, from `extra`) glued with
/// random whitespace or none, up to `max` of them.
fn soup(
    table: &'static [&'static str],
    extra: fn(&mut Mix) -> String,
    max: usize,
) -> impl Strategy<Value = String> {
    seeded(max).prop_map(move |(seed, n)| {
        let mut r = Mix(seed);
        let mut out = String::new();
        for _ in 0..n {
            if r.chance(20) {
                out.push_str(&extra(&mut r));
            } else {
                out.push_str(r.pick::<&str>(table));
            }
            out.push_str(r.pick::<&str>(&["", "", " ", "\n", "\t", "  "]));
        }
        out
    })
}

/// `prefix`, then `unit` many times over, then `suffix`: the shape of every
/// depth attack (up to 20,000 repetitions), often near the limits.
fn run_of(
    prefixes: &'static [&'static str],
    units: &'static [(&'static str, &'static str)],
    atom: &'static str,
) -> impl Strategy<Value = String> {
    (
        proptest::sample::select(prefixes),
        proptest::sample::select(units),
        prop_oneof![3 => 0usize..100, 1 => 0usize..20_000],
        any::<bool>(),
    )
        .prop_map(move |(prefix, (open, close), n, closed)| {
            let close = if closed {
                close.repeat(n)
            } else {
                String::new()
            };
            format!("{prefix}{}{atom}{close}", open.repeat(n))
        })
}

// ---- PromQL ---------------------------------------------------------------

const NS: &str = "fuzz";

/// A string literal in any of PromQL's quotes, with escapes valid and not.
fn quoted(r: &mut Mix) -> String {
    const BODY: &[&str] = &[
        "a", "z", "0", " ", "#", "(", ")", "{", "}", "[", "]", "+", "-", ",", "=", "~", "\n",
        "\\\\", "\\n", "\\t", "\\\"", "\\'", "\\`", "\\x41", "\\u00e9", "\\q", "\"", "'", "`",
    ];
    let q = *r.pick(&["\"", "'", "`"]);
    let body: String = (0..r.below(16)).map(|_| *r.pick(BODY)).collect();
    format!("{q}{body}{q}")
}

fn promql_extra(r: &mut Mix) -> String {
    match r.below(4) {
        0 | 1 => quoted(r),
        2 => {
            let body: String = (0..r.below(20))
                .map(|_| *r.pick(&["\"", "'", "`", "(", "x", " ", "#"]))
                .collect();
            format!("#{body}\n")
        }
        _ => {
            let n = r.below(12) + 1;
            (0..n)
                .map(|_| *r.pick(&["a", "b", "_", ":", "9", "x"]))
                .collect()
        }
    }
}

const PROMQL_TOKENS: &[&str] = &[
    "(",
    ")",
    "[",
    "]",
    "{",
    "}",
    ",",
    "+",
    "-",
    "*",
    "/",
    "%",
    "^",
    "==",
    "!=",
    "<",
    "<=",
    ">",
    ">=",
    "=",
    "=~",
    "!~",
    "and",
    "or",
    "unless",
    "atan2",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "@",
    "start()",
    "end()",
    "sum",
    "avg",
    "max",
    "min",
    "count",
    "topk",
    "quantile",
    "count_values",
    "rate",
    "abs",
    "vector",
    "scalar",
    "label_replace",
    "histogram_quantile",
    "max_over_time",
    "absent",
    "info",
    "up",
    "x",
    "namespace",
    "__name__",
    "5m",
    "1m:",
    ":",
    "1",
    "0.5",
    "1e3",
    "-1",
    "Inf",
    "NaN",
    "#",
    "\\",
    ".",
];

fn selector_expr(r: &mut Mix) -> String {
    let name = *r.pick(&["up", "x", "http_requests_total", ""]);
    let matchers: Vec<String> = (0..r.below(3))
        .map(|_| {
            format!(
                "{}{}\"{}\"",
                r.pick(&["a", "job", "namespace", "__name__", "le"]),
                r.pick(&["=", "!=", "=~", "!~"]),
                r.pick(&["", "fuzz", "other", "f.*", ".*", "a\\\"b", "(x|y)"]),
            )
        })
        .collect();
    if matchers.is_empty() && !name.is_empty() {
        name.to_owned()
    } else {
        format!("{name}{{{}}}", matchers.join(","))
    }
}

/// A query built outwards from a selector by up to 120 wrappers: mostly
/// valid, often deeper than the limit, sometimes reading another namespace.
fn structured_query() -> impl Strategy<Value = String> {
    (any::<u64>(), 0usize..120).prop_map(|(seed, n)| {
        let mut r = Mix(seed);
        let mut x = selector_expr(&mut r);
        for _ in 0..n {
            let y = selector_expr(&mut r);
            x = match r.below(26) {
                0 => format!("sum({x})"),
                1 => format!("{x} + {y}"),
                2 => format!("-{x}"),
                3 => format!("({x})"),
                4 => format!("abs({x})"),
                5 => format!("max_over_time({x}[5m:1m])"),
                6 => format!("rate({y}[5m]) * {x}"),
                7 => format!("{x} and on(a) {y}"),
                8 => format!("topk(3, {x})"),
                9 => format!("sum by (a) ({x})"),
                10 => format!("histogram_quantile(0.9, {x})"),
                11 => format!("{x} > bool 1"),
                12 => format!("clamp({x}, -1, 1)"),
                13 => format!("label_replace({x}, \"a\", \"$1\", \"b\", \"(.*)\")"),
                14 => format!("{x} or vector(0)"),
                15 => format!("count_values(\"v\", {x})"),
                16 => format!("absent({x})"),
                17 => format!("scalar({x}) * {y}"),
                18 => format!("{x} offset 5m"),
                19 => format!("{x} # a comment with a \" quote\n"),
                20 => format!("1 - {x}"),
                21 => format!("{y} / ignoring(le) group_left {x}"),
                22 => format!("info({x})"),
                23 => format!("x{{namespace=\"other\"}} + {x}"),
                24 => format!("{x} @ end()"),
                _ => format!("quantile(scalar({y}), {x})"),
            };
        }
        x
    })
}

fn promql_input() -> impl Strategy<Value = String> {
    prop_oneof![
        1 => garbage(20_000),
        3 => soup(PROMQL_TOKENS, promql_extra, 4000),
        3 => structured_query(),
        2 => run_of(
            &["", "# \"\n", "# '\n", "# `\n", "x{a=\"#\"} + ", "\"(\" + ", "sum(x) + "],
            &[("-", ""), ("(", ")"), ("abs(", ")"), ("- ", ""), ("+", ""), ("sum(", ")"),
              ("-(", ")"), ("x + ", ""), ("x or ", ""), ("(x)[5m:]", ""), ("max(1, ", ")")],
            "up",
        ),
    ]
}

/// Whether every AND-group of `vs` pins the fuzz namespace, and no matcher
/// admits another one.
fn pinned(vs: &VectorSelector) -> bool {
    let m = &vs.matchers;
    let groups: Vec<_> = if m.or_matchers.is_empty() {
        vec![&m.matchers]
    } else {
        m.or_matchers
            .iter()
            .chain([&m.matchers].into_iter().filter(|g| !g.is_empty()))
            .collect()
    };
    groups.iter().all(|g| {
        g.iter()
            .any(|x| x.name == "namespace" && x.op == MatchOp::Equal && x.value == NS)
            && g.iter()
                .filter(|x| x.name == "namespace")
                .all(|x| x.is_match(NS))
    })
}

/// The deepest path of `e` and whether every selector is pinned; a stack,
/// not recursion, for trees of any depth.
fn inspect(e: &Expr) -> Result<usize, String> {
    let (mut todo, mut deepest) = (vec![(e, 1usize)], 0);
    while let Some((e, d)) = todo.pop() {
        deepest = deepest.max(d);
        match e {
            Expr::Aggregate(a) => {
                todo.push((&a.expr, d + 1));
                if let Some(p) = &a.param {
                    todo.push((p, d + 1));
                }
            }
            Expr::Unary(u) => todo.push((&u.expr, d + 1)),
            Expr::Binary(b) => {
                todo.push((&b.lhs, d + 1));
                todo.push((&b.rhs, d + 1));
            }
            Expr::Paren(p) => todo.push((&p.expr, d + 1)),
            Expr::Subquery(s) => todo.push((&s.expr, d + 1)),
            Expr::Call(c) => {
                if c.func.name == "info" {
                    return Err("info() passed namespace enforcement".into());
                }
                todo.extend(c.args.args.iter().map(|a| (&**a, d + 1)));
            }
            Expr::VectorSelector(vs) if !pinned(vs) => {
                return Err(format!("selector {vs} is not pinned to {NS}"));
            }
            Expr::MatrixSelector(ms) if !pinned(&ms.vs) => {
                return Err(format!("selector {} is not pinned to {NS}", ms.vs));
            }
            Expr::MatrixSelector(_) => deepest = deepest.max(d + 1),
            _ => {}
        }
    }
    Ok(deepest)
}

fn check_promql(q: &String) -> Verdict {
    let rewrite = Rewrite {
        extra: &[],
        namespace: Some(NS),
    };
    let out = match promql::prepare(q, rewrite) {
        Ok(out) => out,
        // Our own mistakes (a printer that changed a query, a parser panic)
        // are refusals too, but the fuzzer should find none.
        Err(e) if e.contains("please report this") => return Err(e),
        Err(_) => return Ok(false),
    };
    let expr = promql_parser::parser::parse(&out)
        .map_err(|e| format!("the rewritten query {out:?} does not parse: {e}"))?;
    let depth = inspect(&expr).map_err(|e| format!("{e}, in {out:?}"))?;
    // The bound is on nodes above a leaf; the leaf, and a range's
    // selector, are two more.
    if depth > promql::MAX_DEPTH + 2 {
        return Err(format!("accepted a tree {depth} deep: {out:?}"));
    }
    match promql::prepare(&out, rewrite) {
        Ok(again) if again == out => Ok(true),
        // The added matchers can take it past the length limit.
        Err(e) if e.contains("longer than") => Ok(true),
        again => Err(format!("rewriting {out:?} again gave {again:?}")),
    }
}

fn matcher_soup() -> impl Strategy<Value = String> {
    soup(
        &[
            "a",
            "namespace",
            "__name__",
            "=",
            "!=",
            "=~",
            "!~",
            ",",
            "\"x\"",
            "\"fuzz\"",
            "}",
            "{",
            "(",
            ")",
            "or",
            "+",
            "#",
            "\n",
            "\"\\\"\"",
            "vector(1)",
        ],
        quoted,
        40,
    )
}

/// A preset's `selector`: refused, or matchers that reach every selector of
/// the rewritten query and cannot unpin the namespace.
fn check_selector_matchers(text: &String) -> Verdict {
    let Ok(extra) = promql::parse_selector(text) else {
        return Ok(false);
    };
    let rewrite = Rewrite {
        extra: &extra,
        namespace: Some(NS),
    };
    let Ok(out) = promql::prepare("sum(a) + rate(b[5m])", rewrite) else {
        return Ok(false);
    };
    let expr = promql_parser::parser::parse(&out)
        .map_err(|e| format!("the rewritten query {out:?} does not parse: {e}"))?;
    inspect(&expr).map_err(|e| format!("{e}, in {out:?}"))?;
    for m in &extra {
        if !out.contains(&m.to_string()) {
            return Err(format!("matcher {m} is missing from {out:?}"));
        }
    }
    Ok(true)
}

#[test]
fn promql_guard_and_rewriter() {
    fuzz("promql", promql_input(), text_len, check_promql);
}

/// Label matchers, mostly well formed, some trying to close the braces and
/// smuggle in an expression.
fn matcher_list() -> impl Strategy<Value = String> {
    (any::<u64>(), 0usize..8).prop_map(|(seed, n)| {
        let mut r = Mix(seed);
        let list: Vec<String> = (0..n)
            .map(|_| {
                let value = if r.chance(30) {
                    quoted(&mut r)
                } else {
                    format!(
                        "\"{}\"",
                        r.pick(&["fuzz", "other", "f.*", "", "x\\\"y", "a|b"])
                    )
                };
                format!(
                    "{}{}{value}",
                    r.pick(&["a", "team", "namespace", "__name__", "le", "Ünï"]),
                    r.pick(&["=", "!=", "=~", "!~"]),
                )
            })
            .collect();
        let sep = *r.pick(&[",", ", ", " or ", ","]);
        let tail = *r.pick(&[
            "",
            "",
            "",
            "}) or vector(1) or x{b=\"2\"",
            "} offset 5m",
            "} # x",
            ",",
        ]);
        format!("{}{tail}", list.join(sep))
    })
}

#[test]
fn promql_selector_matchers() {
    fuzz(
        "promql-selector",
        prop_oneof![2 => matcher_list(), 1 => matcher_soup(), 1 => promql_input()],
        text_len,
        check_selector_matchers,
    );
}

// ---- formula ----------------------------------------------------------------

const NAMES: [&str; 3] = ["lag", "partitions", "x"];

fn number(r: &mut Mix) -> String {
    (0..r.below(12) + 1)
        .map(|_| *r.pick(&["0", "1", "9", ".", "e", "E", "+", "-"]))
        .collect()
}

fn formula_input() -> impl Strategy<Value = String> {
    prop_oneof![
        1 => garbage(6_000),
        3 => soup(
            &[
                "(", ")", ",", "+", "-", "*", "/", "lag", "partitions", "x", "nope", "min", "max",
                "ceil", "floor", "round", "abs", "clamp", "sqrt", "0", "1", "2.5", "1e308",
                "1e-308", ".5", "1.", "1..2", "1e", "%", "^", "×", "#",
            ],
            number,
            1500,
        ),
        2 => run_of(
            &["", "lag + ", "min(lag, "],
            &[("(", ")"), ("-", ""), ("abs(", ")"), ("1+", ""), ("min(1,", ")"), ("-(", ")"),
              ("lag*", ""), ("clamp(lag, 0, ", ")")],
            "lag",
        ),
    ]
}

fn check_formula(src: &String) -> Verdict {
    let Ok(f) = Formula::parse(src, &NAMES) else {
        return Ok(false);
    };
    if let Some(i) = f.variables().into_iter().find(|i| *i >= NAMES.len()) {
        return Err(format!("variable index {i} out of range"));
    }
    for values in [
        [1.0, 2.0, 3.0],
        [0.0, 0.0, 0.0],
        [-1.0, 1e308, -1e308],
        [f64::NAN, f64::INFINITY, f64::NEG_INFINITY],
        [5e-324, f64::MAX, f64::MIN_POSITIVE],
    ] {
        if let Ok(v) = f.eval(&values)
            && !v.is_finite()
        {
            return Err(format!("evaluated to {v} with {values:?}"));
        }
    }
    Ok(true)
}

#[test]
fn formula_parser() {
    fuzz("formula", formula_input(), text_len, check_formula);
}

// ---- label selectors ------------------------------------------------------

fn label_word(r: &mut Mix) -> String {
    (0..r.below(70))
        .map(|_| *r.pick(&["a", "z", "0", "9", "A", ".", "_", "-", "/"]))
        .collect()
}

fn label_selector_input() -> impl Strategy<Value = String> {
    prop_oneof![
        1 => garbage(20_000),
        4 => soup(
            &[
                "app", "tier", "app.kubernetes.io/name", "a-b.c_d", "web", "v1", "=", "==", "!=",
                "!", ",", " in ", " notin ", "(", ")", "in", "notin", "-", "/", ".", "", " ",
                "Bad_Prefix/a", "x/", "/x", "é",
            ],
            label_word,
            4000,
        ),
        1 => run_of(&["", "a in ", "a=b,"], &[("(", ")"), ("a,", ""), ("!", ""), ("a in (x,", ")")], "b"),
        3 => (any::<u64>(), prop_oneof![1usize..4, 1usize..64]).prop_map(|(seed, n)| {
            // Mostly well-formed terms.
            let mut r = Mix(seed);
            let word = |r: &mut Mix| match r.below(4) {
                0 => label_word(r),
                _ => r.pick(&["app", "web", "v1", "a-b.c_d", "x9", "Z", "tier.v2"]).to_string(),
            };
            let list = |r: &mut Mix| {
                let vs: Vec<String> = (0..r.below(4) + 1).map(|_| word(r)).collect();
                vs.join(*r.pick(&[",", ", "]))
            };
            let terms: Vec<String> = (0..n)
                .map(|_| match r.below(6) {
                    0 => format!("{}={}", word(&mut r), word(&mut r)),
                    1 => format!("{} == {}", word(&mut r), word(&mut r)),
                    2 => format!("{}!={}", word(&mut r), word(&mut r)),
                    3 => format!("{} in ({})", word(&mut r), list(&mut r)),
                    4 => format!("{} notin ({})", word(&mut r), list(&mut r)),
                    _ => format!("{}{}", r.pick(&["", "!"]), word(&mut r)),
                })
                .collect();
            terms.join(*r.pick(&[",", ", ", " ,"]))
        }),
    ]
}

fn check_label_selector(text: &String) -> Verdict {
    let Ok(s) = Selector::parse(text) else {
        return Ok(false);
    };
    let shown = s.to_string();
    match Selector::parse(&shown) {
        Ok(again) if again == s && again.to_string() == shown => {}
        again => return Err(format!("{shown:?} parsed back as {again:?}, not {s:?}")),
    }
    let labels: Labels = [
        ("app", "web"),
        ("tier", ""),
        ("app.kubernetes.io/name", "v1"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let _ = s.matches(&labels);
    let _ = s.matches(&Labels::new());
    Ok(true)
}

#[test]
fn label_selector_parser() {
    fuzz(
        "selector",
        label_selector_input(),
        text_len,
        check_label_selector,
    );
}

// ---- the sink's wire reader ----------------------------------------------

/// Message bytes, and for a valid encoding what a full decode keeps.
#[derive(Clone)]
struct WireInput {
    bytes: Vec<u8>,
    expected: Option<Vec<(String, f64)>>,
}

impl Debug for WireInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} bytes (valid: {}): {:02x?}",
            self.bytes.len(),
            self.expected.is_some(),
            self.bytes
        )
    }
}

const STAT_NAMES: &[&str] = &[
    "http.inbound_0.0.0.0_8080;.downstream_rq_active",
    "http.inbound_0.0.0.0_8081.downstream_rq_active",
    "http.admin.downstream_rq_active",
    "http.inbound_0.0.0.0_9000;.downstream_rq_active",
    "cluster.outbound|80||svc.upstream_cx_active",
    "server.live",
    "",
];

fn filter() -> NameFilter {
    NameFilter::defaults(9000)
}

fn value(r: &mut Mix) -> f64 {
    match r.below(5) {
        0 => 0.0,
        1 => -0.0,
        2 => r.below(100) as f64,
        _ => f64::from_bits(r.next()),
    }
}

fn family(r: &mut Mix) -> MetricFamily {
    let name = match r.below(6) {
        0 => None,
        1 => Some(label_word(r)),
        _ => Some(r.pick(STAT_NAMES).to_string()),
    };
    let metric = (0..r.below(4))
        .map(|_| Metric {
            gauge: r.chance(70).then(|| Gauge {
                value: r.chance(90).then(|| value(r)),
            }),
            untyped: r.chance(20).then(|| Untyped {
                value: r.chance(90).then(|| value(r)),
            }),
            ..Default::default()
        })
        .collect();
    MetricFamily {
        name,
        help: r.chance(30).then(|| label_word(r)),
        r#type: Some(1),
        metric,
        ..Default::default()
    }
}

/// The families (cap on distinct names) the wire reader keeps.
const MAX_KEPT: usize = activescale::store::DEFAULT_MAX_FAMILIES;

/// What the wire reader must keep from `families`, computed from a full
/// decode with the sink's rules: a metric's value is its untyped value, else
/// its gauge's (a value-less sub-message is 0); each value and the family's
/// sum must be a gauge value; a repeated name is set again; new names past
/// the cap are refused.
fn reference(families: &[MetricFamily]) -> Vec<(String, f64)> {
    let f = filter();
    let mut kept: Vec<(String, f64)> = Vec::new();
    for fam in families {
        let Some(name) = fam.name.as_ref() else {
            continue;
        };
        if !f.keeps(name.as_bytes()) {
            continue;
        }
        let values: Vec<f64> = fam
            .metric
            .iter()
            .filter_map(|m| {
                m.untyped
                    .map(|u| u.value.unwrap_or(0.0))
                    .or(m.gauge.map(|g| g.value.unwrap_or(0.0)))
            })
            .collect();
        if values.is_empty() || !values.iter().all(|v| wire::is_gauge(*v)) {
            continue;
        }
        let sum: f64 = values.iter().sum();
        if !wire::is_gauge(sum) {
            continue;
        }
        let sum = sum + 0.0;
        if let Some(earlier) = kept.iter_mut().find(|(n, _)| n == name) {
            earlier.1 = sum;
        } else if kept.len() < MAX_KEPT {
            kept.push((name.clone(), sum));
        }
    }
    kept
}

fn valid_message(r: &mut Mix, families: usize) -> (Vec<u8>, Vec<MetricFamily>) {
    use envoy_types::pb::envoy::service::metrics::v3::{
        StreamMetricsMessage, stream_metrics_message::Identifier,
    };
    let families: Vec<MetricFamily> = (0..families).map(|_| family(r)).collect();
    let msg = StreamMetricsMessage {
        identifier: r.chance(50).then(Identifier::default),
        envoy_metrics: families.clone(),
    };
    (msg.encode_to_vec(), families)
}

fn wire_input() -> impl Strategy<Value = WireInput> {
    prop_oneof![
        2 => seeded(4096).prop_map(|(seed, n)| {
            let mut r = Mix(seed);
            WireInput { bytes: (0..n).map(|_| r.next() as u8).collect(), expected: None }
        }),
        3 => seeded(2000).prop_map(|(seed, n)| {
            let (bytes, fams) = valid_message(&mut Mix(seed), n);
            WireInput { bytes, expected: Some(reference(&fams)) }
        }),
        3 => seeded(200).prop_map(|(seed, n)| {
            // A valid message, then flipped, cut, inserted and overlong bytes.
            let mut r = Mix(seed);
            let (mut bytes, _) = valid_message(&mut r, n);
            for _ in 0..r.below(8) + 1 {
                let (i, b) = (r.below(bytes.len() + 1), r.next() as u8);
                match r.below(4) {
                    0 if i < bytes.len() => bytes[i] ^= b | 1,
                    1 => bytes.truncate(i),
                    2 => bytes.insert(i, b),
                    _ => bytes.splice(i..i, [0xff; 10]).for_each(drop),
                }
            }
            WireInput { bytes, expected: None }
        }),
        1 => (1usize..500_000).prop_map(|n| WireInput {
            // Empty families, as many as fit in a megabyte.
            bytes: [0x12, 0x00].repeat(n),
            expected: Some(Vec::new()),
        }),
        1 => (1usize..100_000).prop_map(|n| WireInput {
            // Length prefixes one after another, each claiming the rest.
            bytes: (0..n).flat_map(|_| [0x12u8, 0xff, 0xff, 0xff, 0x7f]).collect(),
            expected: None,
        }),
    ]
}

fn check_wire(input: &WireInput) -> Verdict {
    let (mut kept, mut skipped) = (Vec::new(), Vec::new());
    let parsed = wire::parse(&input.bytes, &filter(), MAX_KEPT, &mut kept, &mut skipped);
    let Some(expected) = &input.expected else {
        if let Ok(p) = &parsed {
            if p.families > input.bytes.len() as u64 / 2 {
                return Err(format!(
                    "{} families in {} bytes",
                    p.families,
                    input.bytes.len()
                ));
            }
            let f = filter();
            if let Some(k) = kept.iter().find(|k| !f.keeps(k.name.as_bytes())) {
                return Err(format!("kept {k:?}, which the filter drops"));
            }
        }
        return Ok(parsed.is_ok());
    };
    let p = parsed.map_err(|e| format!("a valid message was refused: {e}"))?;
    let same = kept.len() == expected.len()
        && kept
            .iter()
            .zip(expected)
            .all(|(a, b)| a.name == b.0 && a.value.to_bits() == b.1.to_bits());
    if !same {
        return Err(format!(
            "kept {kept:?}, a full decode keeps {expected:?} (families: {})",
            p.families
        ));
    }
    Ok(true)
}

fn wire_len(input: &WireInput) -> usize {
    input.bytes.len()
}

#[test]
fn sink_wire_reader() {
    fuzz("wire", wire_input(), wire_len, check_wire);
}
