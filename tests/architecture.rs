//! The crate's top-level modules depend on each other one way: no import
//! circles. A circle means neither side can be understood, tested or
//! changed alone, and it is how a leaf (metadata, config) stops being one.
//!
//! The graph is read from the source: every `crate::<module>` path in
//! `src/<module>.rs` or under `src/<module>/`, `use crate::{a, b::c}` groups
//! included, outside comments, string literals and `#[cfg(test)]` items.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

/// Edges left out of the check while the circles they close are being
/// broken; remove an entry once its edge is gone (the stale-entry test says
/// when). `config` becomes a leaf: each part gets its own settings struct.
/// Edges the acyclicity check ignores, each with its reason. Empty: the
/// crate's top-level modules import each other without any circle.
const ALLOWED: &[(&str, &str)] = &[];

type Graph = BTreeMap<String, BTreeSet<String>>;

#[test]
fn top_level_modules_import_each_other_one_way() {
    let mut graph = graph(&src());
    for (from, to) in ALLOWED {
        if let Some(out) = graph.get_mut(*from) {
            out.remove(*to);
        }
    }
    if let Some(cycle) = find_cycle(&graph) {
        panic!(
            "import circle between top-level modules: {}\n(full graph: {graph:#?})",
            cycle.join(" → ")
        );
    }
}

#[test]
fn the_allow_list_names_only_edges_that_exist() {
    let graph = graph(&src());
    let stale: Vec<_> = ALLOWED
        .iter()
        .filter(|(from, to)| !graph.get(*from).is_some_and(|out| out.contains(*to)))
        .collect();
    assert!(
        stale.is_empty(),
        "these edges are gone: remove them from ALLOWED in tests/architecture.rs: {stale:?}"
    );
}

#[test]
fn the_reader_sees_groups_and_skips_comments_strings_and_tests() {
    let text = r##"
        //! see [`crate::gone`]
        use crate::{a::{B, C}, b, c::d::E};
        /* crate::block */
        fn f() { crate::d::g(); let s = "crate::quoted"; let r = r#"crate::raw"#; let c = '"'; }
        fn l<'a>(x: &'a str) -> &'a str { crate::e::h(x) }
        #[cfg(test)]
        mod tests { use crate::tested; fn t() { if true { crate::inner(); } } }
        use crate::f;
    "##;
    let found = references(&strip_tests(&strip(text)));
    let want: BTreeSet<String> = ["a", "b", "c", "d", "e", "f"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(found, want);
}

#[test]
fn a_cycle_is_found_and_named() {
    let mut g = Graph::new();
    for (a, b) in [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")] {
        g.entry(a.into()).or_default().insert(b.into());
    }
    assert_eq!(
        find_cycle(&g),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
    g.get_mut("c").unwrap().remove("a");
    assert_eq!(find_cycle(&g), None);
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Top-level module → the other top-level modules it names.
fn graph(src: &Path) -> Graph {
    let modules = modules(src);
    let mut graph = Graph::new();
    for (module, files) in &modules {
        let mut out = BTreeSet::new();
        for file in files {
            let text = fs::read_to_string(file).unwrap();
            out.extend(
                references(&strip_tests(&strip(&text)))
                    .into_iter()
                    .filter(|m| m != module && modules.contains_key(m)),
            );
        }
        graph.insert(module.clone(), out);
    }
    graph
}

/// Top-level modules and their files: `src/<m>.rs`, or every `.rs` file under
/// `src/<m>/`. The crate root (`lib.rs`) and the binary (`main.rs`) are not
/// modules of their own.
fn modules(src: &Path) -> BTreeMap<String, Vec<PathBuf>> {
    let mut out = BTreeMap::new();
    for entry in fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        if path.is_dir() && path.join("mod.rs").exists() {
            out.insert(name, rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") && name != "lib" && name != "main" {
            out.insert(name, vec![path]);
        }
    }
    out
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

/// `text` without comments, and with the contents of string and character
/// literals blanked, so that neither can look like a path or a brace.
fn strip(text: &str) -> String {
    let c: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < c.len() {
        match (c[i], c.get(i + 1).copied()) {
            ('/', Some('/')) => {
                while i < c.len() && c[i] != '\n' {
                    i += 1;
                }
            }
            ('/', Some('*')) => {
                let mut depth = 0;
                while i < c.len() {
                    if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                        depth += 1;
                        i += 2;
                    } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
            }
            ('r', Some('#' | '"')) if raw_string_start(&c, i) => {
                let hashes = c[i + 1..].iter().take_while(|&&h| h == '#').count();
                if c.get(i + 1 + hashes) != Some(&'"') {
                    out.push('r');
                    i += 1;
                    continue;
                }
                let close: Vec<char> = std::iter::once('"')
                    .chain(std::iter::repeat_n('#', hashes))
                    .collect();
                i += 2 + hashes;
                while i < c.len() && !c[i..].starts_with(&close) {
                    i += 1;
                }
                i += close.len();
                out.push_str("\"\"");
            }
            ('"', _) => {
                i += 1;
                while i < c.len() && c[i] != '"' {
                    i += if c[i] == '\\' { 2 } else { 1 };
                }
                i += 1;
                out.push_str("\"\"");
            }
            // A character literal, not a lifetime: `'x'` or `'\n'`.
            ('\'', Some('\\')) => {
                i += 2;
                while i < c.len() && c[i] != '\'' {
                    i += 1;
                }
                i += 1;
                out.push_str("' '");
            }
            ('\'', Some(_)) if c.get(i + 2) == Some(&'\'') => {
                i += 3;
                out.push_str("' '");
            }
            (ch, _) => {
                out.push(ch);
                i += 1;
            }
        }
    }
    out
}

/// Whether the `r` at `i` opens a raw string (`r"`, `r#"`, `br"`) rather
/// than ending an identifier.
fn raw_string_start(c: &[char], i: usize) -> bool {
    let ident_at = |j: usize| c[j].is_alphanumeric() || c[j] == '_';
    match i {
        0 => true,
        1 => !ident_at(0) || c[0] == 'b',
        _ => !ident_at(i - 1) || (c[i - 1] == 'b' && !ident_at(i - 2)),
    }
}

/// `text` (already [`strip`]ped) without the items marked `#[cfg(test)]`:
/// up to the item's `;`, or through its braced body.
fn strip_tests(text: &str) -> String {
    const MARK: &str = "#[cfg(test)]";
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(MARK) {
        out.push_str(&rest[..at]);
        rest = &rest[at + MARK.len()..];
        let Some(end) = rest.find(['{', ';']) else {
            return out;
        };
        if rest.as_bytes()[end] == b';' {
            rest = &rest[end + 1..];
            continue;
        }
        let mut depth = 0usize;
        let mut close = rest.len();
        for (j, b) in rest.bytes().enumerate().skip(end) {
            match b {
                b'{' => depth += 1,
                b'}' => {
                    depth -= 1;
                    if depth == 0 {
                        close = j + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        rest = &rest[close.min(rest.len())..];
    }
    out.push_str(rest);
    out
}

/// The first segment of every `crate::` path in `text`, groups included.
fn references(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("crate::") {
        let boundary = rest[..at]
            .chars()
            .next_back()
            .is_none_or(|ch| !(ch.is_alphanumeric() || ch == '_'));
        rest = rest[at + "crate::".len()..].trim_start();
        if !boundary {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1usize;
            let mut item_start = true;
            for (j, ch) in group.char_indices() {
                match ch {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            rest = &group[j..];
                            break;
                        }
                    }
                    ',' if depth == 1 => item_start = true,
                    ch if item_start && depth == 1 && !ch.is_whitespace() => {
                        item_start = false;
                        out.insert(ident(&group[j..]));
                    }
                    _ => {}
                }
            }
        } else {
            out.insert(ident(rest));
        }
    }
    out.remove("");
    out.remove("self");
    out
}

fn ident(text: &str) -> String {
    text.chars()
        .take_while(|ch| ch.is_alphanumeric() || *ch == '_')
        .collect()
}

/// A path `a → … → a` through the graph, if there is one.
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &Graph,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(start) = path.iter().position(|n| n == node) {
            let mut cycle = path[start..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}
