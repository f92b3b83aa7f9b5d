//! docs/protocol.md and the tests read as one table: every numbered rule (`**P<n>**`) has a row
//! in its section 10, and every test named there exists and is a test. A rule without a test, a
//! renamed test or a rule added without a row fails here.

use std::collections::BTreeSet;
use std::path::Path;

fn repo(rel: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The rule ids defined in the text before section 10, in order.
fn defined_rules(doc: &str) -> Vec<u32> {
    let body = doc.split("\n## 10.").next().expect("text");
    body.split("**P")
        .skip(1)
        .filter_map(|rest| rest.split_once("**"))
        .filter_map(|(n, _)| n.parse().ok())
        .collect()
}

/// Section 10's rows: the rule id and the test references of its cell.
fn table(doc: &str) -> Vec<(u32, String)> {
    let section = doc.split("\n## 10.").nth(1).expect("a section 10");
    section
        .lines()
        .filter_map(|l| l.strip_prefix("| P"))
        .filter_map(|rest| {
            let (id, cell) = rest.split_once('|')?;
            Some((
                id.trim().parse().ok()?,
                cell.trim_end_matches('|').trim().to_owned(),
            ))
        })
        .collect()
}

/// The `path::function` references of a cell.
fn references(cell: &str) -> Vec<(String, String)> {
    cell.split('`')
        .skip(1)
        .step_by(2)
        .filter_map(|r| r.rsplit_once("::"))
        .map(|(path, name)| (path.to_owned(), name.to_owned()))
        .collect()
}

/// Whether `source` defines `name` as a test that runs (a `#[test]` or `#[tokio::test…]`
/// attribute right above its `fn`, and no `#[ignore]` among the attributes).
fn defines_test(source: &str, name: &str) -> bool {
    let lines: Vec<&str> = source.lines().collect();
    lines.iter().enumerate().any(|(i, line)| {
        let line = line.trim_start();
        let defines = [format!("fn {name}("), format!("async fn {name}(")]
            .iter()
            .any(|d| line.starts_with(d.as_str()));
        let attributes: Vec<&str> = lines[..i]
            .iter()
            .rev()
            .map(|l| l.trim_start())
            .take_while(|l| l.starts_with("#["))
            .collect();
        defines
            && attributes
                .first()
                .is_some_and(|a| a.starts_with("#[test]") || a.starts_with("#[tokio::test"))
            && !attributes.iter().any(|a| a.starts_with("#[ignore"))
    })
}

#[test]
fn every_rule_is_numbered_once_in_order() {
    let doc = repo("docs/protocol.md");
    let rules = defined_rules(&doc);
    assert!(!rules.is_empty(), "no numbered rules");
    let expected: Vec<u32> = (1..=u32::try_from(rules.len()).expect("few")).collect();
    assert_eq!(
        rules, expected,
        "rule ids must be P1, P2, … in document order"
    );
}

#[test]
fn every_rule_has_a_row_and_every_row_names_tests() {
    let doc = repo("docs/protocol.md");
    let rules: BTreeSet<u32> = defined_rules(&doc).into_iter().collect();
    let rows = table(&doc);
    let ids: Vec<u32> = rows.iter().map(|(id, _)| *id).collect();
    assert_eq!(
        ids,
        rules.iter().copied().collect::<Vec<_>>(),
        "one row per rule, in order"
    );
    for (id, cell) in &rows {
        assert!(!cell.contains("MISSING"), "P{id} has no test");
        assert!(!references(cell).is_empty(), "P{id} names no test: {cell}");
    }
}

#[test]
fn every_named_test_exists() {
    let doc = repo("docs/protocol.md");
    let mut missing = Vec::new();
    for (id, cell) in table(&doc) {
        for (path, name) in references(&cell) {
            let source = repo(&path);
            if !defines_test(&source, &name) {
                missing.push(format!("P{id}: {path}::{name}"));
            }
        }
    }
    assert!(missing.is_empty(), "not a test: {missing:#?}");
}

#[test]
fn the_checks_see_tests_and_only_tests() {
    let source = "#[test]\nfn a_test() {}\nfn a_helper() {}\n#[tokio::test(flavor = \"x\")]\nasync fn b() {}\n#[ignore]\n#[test]\nfn skipped() {}";
    assert!(defines_test(source, "a_test"));
    assert!(defines_test(source, "b"));
    assert!(!defines_test(source, "a_helper"));
    assert!(!defines_test(source, "a_tes"));
    assert!(
        !defines_test(source, "skipped"),
        "an ignored test proves nothing"
    );
    assert_eq!(
        references("`tests/x.rs::a`, `src/y.rs::b`"),
        [
            ("tests/x.rs".to_owned(), "a".to_owned()),
            ("src/y.rs".to_owned(), "b".to_owned())
        ]
    );
}
