//! Session state under transaction pooling. Some SQL leaves state on the server connection
//! that outlives the transaction (a plain `SET`, session advisory locks, `LISTEN`, temporary
//! tables, `WITH HOLD` cursors, SQL `PREPARE`, `LOAD`): the next client on that connection
//! would inherit it and this client would lose it. [`session_state`] spots such statements
//! so the client can be pinned to its connection (or the use reported).
//!
//! The parameters PostgreSQL reports (`ParameterStatus`) are different: the pooler tracks each
//! client's values and sets them on whichever connection the client gets, so setting them is
//! safe ([`TRACKED`]).

/// Parameters whose values follow each client from server connection to server connection.
pub const TRACKED: &[&str] = &[
    "client_encoding",
    "DateStyle",
    "IntervalStyle",
    "TimeZone",
    "application_name",
    "standard_conforming_strings",
];

/// The place in [`TRACKED`] of parameter `name`, however it is spelled.
fn place(name: &str) -> Option<usize> {
    TRACKED.iter().position(|t| t.eq_ignore_ascii_case(name))
}

/// The canonical name of a tracked parameter, however the client spelled it.
pub fn tracked(name: &str) -> Option<&'static str> {
    place(name).map(|at| TRACKED[at])
}

/// The values of the tracked parameters, by their place in [`TRACKED`] (`None`: never
/// reported). Comparing a client's with a server connection's is a handful of short
/// string comparisons, done each time the client borrows a connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tracked([Option<String>; TRACKED.len()]);

impl Tracked {
    /// Records `value` for `name` if it is tracked (any spelling); false if it is not.
    pub fn set(&mut self, name: &str, value: &str) -> bool {
        let Some(at) = place(name) else {
            return false;
        };
        match &mut self.0[at] {
            Some(v) => value.clone_into(v),
            slot => *slot = Some(value.to_owned()),
        }
        true
    }

    /// The parameters whose value here differs from `other`'s, with the value here.
    pub fn differing<'a>(&'a self, other: &Tracked) -> Vec<(&'static str, &'a str)> {
        let mut out = Vec::new();
        for (at, (mine, theirs)) in self.0.iter().zip(&other.0).enumerate() {
            if let Some(mine) = mine {
                if theirs.as_ref() != Some(mine) {
                    out.push((TRACKED[at], mine.as_str()));
                }
            }
        }
        out
    }
}

/// Whether `sql` mentions any of `words` (ASCII lowercase, matched in any case): most
/// statements mention none of the words that matter here, and are passed over without
/// parsing. The search runs on a word's least common letter, so SQL full of `a`s and `d`s
/// costs no more than any other.
fn mentions(sql: &[u8], words: &[&[u8]]) -> bool {
    const RARE: &[u8] = b"qjzxvkwyfbghpmu";
    words.iter().any(|word| {
        let pivot = RARE
            .iter()
            .find_map(|r| word.iter().position(|b| b == r))
            .unwrap_or(0);
        let b = word[pivot];
        memchr::memchr2_iter(b, b.to_ascii_uppercase(), sql).any(|at| {
            at >= pivot
                && sql
                    .get(at - pivot..at - pivot + word.len())
                    .is_some_and(|w| w.eq_ignore_ascii_case(word))
        })
    })
}

/// Statements starting with these words leave session state (`SET`, `RESET`, `LISTEN`,
/// `PREPARE`, `LOAD`, `DECLARE`, `CREATE`); a comment hides a statement's first word from a
/// quick look.
const LEAVES_STATE: &[&[u8]] = &[
    b"set", b"reset", b"listen", b"prepare", b"load", b"declare", b"create", b"-", b"/",
];

/// Whether `sql` is none of the statements the pooler looks into: no statement of it starts
/// with a word that leaves session state, drops a database or prepared statements, or with
/// a comment, and it mentions no advisory lock. Nearly every statement an application sends
/// is ordinary, and is relayed after this one quick look.
pub fn ordinary(sql: &[u8]) -> bool {
    const LOOKED_AT: &[&[u8]] = &[
        b"set",
        b"reset",
        b"listen",
        b"prepare",
        b"load",
        b"declare",
        b"create",
        b"-",
        b"/",
        b"drop",
        b"discard",
        b"deallocate",
    ];
    !starts_statement(sql, LOOKED_AT) && !mentions(sql, &[b"advisory"])
}

/// Whether a statement of `sql` may begin with one of `first` (ASCII lowercase, matched in
/// any case). `UPDATE t SET ...` does not begin with `SET`: its `SET` is inside.
fn starts_statement(sql: &[u8], first: &[&[u8]]) -> bool {
    std::iter::once(0)
        .chain(memchr::memchr_iter(b';', sql).map(|at| at + 1))
        .any(|start| {
            let rest = &sql[start..];
            let begin = rest.iter().position(|b| !b.is_ascii_whitespace());
            begin.is_some_and(|begin| {
                let rest = &rest[begin..];
                let lead = rest[0].to_ascii_lowercase();
                first.iter().any(|word| {
                    word[0] == lead
                        && rest
                            .get(..word.len())
                            .is_some_and(|w| w.eq_ignore_ascii_case(word))
                })
            })
        })
}

/// What in `sql` would leave state on the server connection past the transaction, if any.
pub fn session_state(sql: &[u8]) -> Option<&'static str> {
    if !mentions(sql, &[b"advisory"]) && !starts_statement(sql, LEAVES_STATE) {
        return None;
    }
    let sql = String::from_utf8_lossy(sql).to_ascii_lowercase();
    if sql.contains("pg_advisory_lock") || sql.contains("pg_try_advisory_lock") {
        return Some("session advisory lock");
    }
    for statement in statements(&sql) {
        let words: Vec<&str> = statement.split_whitespace().take(4).collect();
        let word = |i: usize| words.get(i).copied().unwrap_or("");
        let found = match word(0) {
            "set" | "reset" => match word(1) {
                "local" | "transaction" | "constraints" => None,
                "time" if word(2) == "zone" => None,
                "names" => None,
                "session" if word(2) == "authorization" => Some("SET SESSION AUTHORIZATION"),
                "session" if word(2) == "characteristics" => Some("SET SESSION CHARACTERISTICS"),
                "session" => set_target(word(2)),
                "all" => None,
                name => set_target(name),
            },
            "listen" => Some("LISTEN"),
            "prepare" => Some("PREPARE"),
            "load" => Some("LOAD"),
            "declare" if statement.contains(" with hold") => Some("cursor WITH HOLD"),
            "create" if temporary(&words) && !statement.contains("on commit drop") => {
                Some("temporary table")
            }
            _ => None,
        };
        if found.is_some() {
            return found;
        }
    }
    None
}

/// `SET name ...` is session state unless `name` is tracked.
fn set_target(name: &str) -> Option<&'static str> {
    let name = name
        .split(['=', ' '])
        .next()
        .unwrap_or(name)
        .trim_matches('"');
    match tracked(name) {
        Some(_) => None,
        None => Some("SET"),
    }
}

fn temporary(words: &[&str]) -> bool {
    words
        .iter()
        .skip(1)
        .take(2)
        .any(|w| matches!(*w, "temp" | "temporary"))
}

/// The statements of `sql`, comments removed, split at semicolons outside quotes.
fn statements(sql: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = sql.chars().peekable();
    let mut quote: Option<char> = None;
    while let Some(c) = chars.next() {
        let current = out.last_mut().expect("never empty");
        match (quote, c) {
            (Some(q), c) if c == q => {
                quote = None;
                current.push(c);
            }
            (Some(_), c) => current.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                current.push(c);
            }
            (None, '-') if chars.peek() == Some(&'-') => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
                current.push(' ');
            }
            (None, '/') if chars.peek() == Some(&'*') => {
                chars.next();
                let mut last = ' ';
                for c in chars.by_ref() {
                    if last == '*' && c == '/' {
                        break;
                    }
                    last = c;
                }
                current.push(' ');
            }
            (None, ';') => out.push(String::new()),
            (None, c) => current.push(c),
        }
    }
    out.into_iter()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

/// The command tag PostgreSQL answers `sql` with, if `sql` is a `BEGIN` without options
/// (`BEGIN`, `BEGIN WORK`, `BEGIN TRANSACTION`, `START TRANSACTION`, any case, a trailing
/// `;` allowed). Outside a transaction such a statement cannot fail while the connection
/// lives, which is what lets the pooler answer it before the transaction has a connection.
pub fn plain_begin(sql: &[u8]) -> Option<&'static str> {
    if sql.len() > 32 {
        return None;
    }
    let sql = std::str::from_utf8(sql).ok()?;
    let sql = sql.trim_end_matches(|c: char| c == ';' || c.is_ascii_whitespace());
    let mut words = sql.split_ascii_whitespace();
    let first = words.next()?;
    let second = words.next();
    if words.next().is_some() {
        return None;
    }
    let is = |word: &str, what: &str| word.eq_ignore_ascii_case(what);
    match second {
        None if is(first, "begin") => Some("BEGIN"),
        Some(w) if is(first, "begin") && (is(w, "work") || is(w, "transaction")) => Some("BEGIN"),
        Some(w) if is(first, "start") && is(w, "transaction") => Some("START TRANSACTION"),
        _ => None,
    }
}

/// `SET` statements that give a server connection `params`, as one simple query.
pub fn set_query(params: &[(&str, &str)]) -> String {
    params
        .iter()
        .map(|(name, value)| format!("SET {name} TO '{}'", value.replace('\'', "''")))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Whether `sql` is `DISCARD ALL` or `DEALLOCATE ALL`, which drop every prepared statement.
pub fn drops_all_statements(sql: &[u8]) -> bool {
    if !mentions(sql, &[b"discard", b"deallocate"]) {
        return false;
    }
    let sql = String::from_utf8_lossy(sql).to_ascii_lowercase();
    statements(&sql).iter().any(|s| {
        let words: Vec<&str> = s.split_whitespace().collect();
        matches!(
            words.as_slice(),
            ["discard", "all"] | ["deallocate", "all"] | ["deallocate", "prepare", "all"]
        )
    })
}

/// The database `sql` drops, if it is `DROP DATABASE name` (alone).
pub fn drops_database(sql: &[u8]) -> Option<String> {
    if !mentions(sql, &[b"drop"]) {
        return None;
    }
    let sql = String::from_utf8_lossy(sql);
    let statements = statements(&sql);
    let [statement] = statements.as_slice() else {
        return None;
    };
    let words: Vec<&str> = statement.split_whitespace().collect();
    let lower = |i: usize| words.get(i).map(|w| w.to_ascii_lowercase());
    if lower(0)? != "drop" || lower(1)? != "database" {
        return None;
    }
    let at = if lower(2)? == "if" && lower(3).as_deref() == Some("exists") {
        4
    } else {
        2
    };
    let name = words.get(at)?.trim_end_matches(';');
    Some(
        match name.strip_prefix('"').and_then(|n| n.strip_suffix('"')) {
            Some(quoted) => quoted.to_owned(),
            None => name.to_ascii_lowercase(),
        },
    )
}

/// The statement `DEALLOCATE name` (alone) drops, if `sql` is that.
pub fn deallocates(sql: &[u8]) -> Option<String> {
    if !mentions(sql, &[b"deallocate"]) {
        return None;
    }
    let sql = String::from_utf8_lossy(sql);
    let mut statements = statements(&sql);
    if statements.len() != 1 {
        return None;
    }
    let statement = statements.pop()?;
    let words: Vec<&str> = statement.split_whitespace().collect();
    let name = match words.as_slice() {
        [first, name] if first.eq_ignore_ascii_case("deallocate") => *name,
        [first, second, name]
            if first.eq_ignore_ascii_case("deallocate")
                && second.eq_ignore_ascii_case("prepare") =>
        {
            *name
        }
        _ => return None,
    };
    if name.eq_ignore_ascii_case("all") {
        return None;
    }
    Some(
        match name.strip_prefix('"').and_then(|n| n.strip_suffix('"')) {
            Some(quoted) => quoted.to_owned(),
            None => name.to_ascii_lowercase(),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_that_outlive_a_transaction_are_spotted() {
        for (sql, what) in [
            ("SET search_path = app", "SET"),
            ("set session statement_timeout to 5", "SET"),
            ("SET ROLE admin", "SET"),
            ("select pg_advisory_lock(1)", "session advisory lock"),
            ("LISTEN jobs", "LISTEN"),
            ("create temp table t (x int)", "temporary table"),
            ("CREATE TEMPORARY TABLE t (x int)", "temporary table"),
            (
                "declare c cursor with hold for select 1",
                "cursor WITH HOLD",
            ),
            ("PREPARE q AS select 1", "PREPARE"),
            ("begin; set work_mem = '1GB'; commit", "SET"),
            ("/* why */ SET search_path = x", "SET"),
            ("  \n\tset role reporter", "SET"),
        ] {
            assert_eq!(session_state(sql.as_bytes()), Some(what), "{sql}");
        }
    }

    #[test]
    fn transaction_scoped_and_tracked_statements_are_not() {
        for sql in [
            "select 1",
            "SET LOCAL work_mem = '1GB'",
            "set transaction isolation level serializable",
            "SET TIME ZONE 'UTC'",
            "set timezone = 'UTC'",
            "SET application_name TO 'x'",
            "select pg_advisory_xact_lock(1)",
            "create temp table t (x int) on commit drop",
            "declare c cursor for select 1",
            "select 'set search_path = x; listen y'",
            "-- SET search_path = x\nselect 1",
            "insert into settings values ('prepare')",
            "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = 2",
        ] {
            assert_eq!(session_state(sql.as_bytes()), None, "{sql}");
        }
    }

    #[test]
    fn only_statements_worth_a_look_are_not_ordinary() {
        for sql in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
            "UPDATE pgbench_branches SET bbalance = bbalance + 1 WHERE bid = 2",
            "insert into settings values ('prepare')",
            "select 'advice'",
            "END;",
        ] {
            assert!(ordinary(sql.as_bytes()), "{sql}");
        }
        for sql in [
            "SET search_path = app",
            "select 1; drop database x",
            "DISCARD ALL",
            "deallocate q1",
            "/* hint */ select 1",
            "SELECT PG_ADVISORY_LOCK(1)",
            "select pg_try_advisory_xact_lock(1)",
            "  listen jobs",
        ] {
            assert!(!ordinary(sql.as_bytes()), "{sql}");
        }
    }

    #[test]
    fn statement_dropping_sql_is_recognised() {
        assert!(drops_all_statements(b"DISCARD ALL"));
        assert!(drops_all_statements(b"deallocate all;"));
        assert!(!drops_all_statements(b"select 'discard all'"));
        assert_eq!(deallocates(b"DEALLOCATE _pg3_0").as_deref(), Some("_pg3_0"));
        assert_eq!(
            deallocates(b"deallocate prepare \"Q1\"").as_deref(),
            Some("Q1")
        );
        assert_eq!(deallocates(b"DEALLOCATE ALL"), None);
        assert_eq!(
            drops_database(b"DROP DATABASE test_app").as_deref(),
            Some("test_app")
        );
        assert_eq!(
            drops_database(b"drop database if exists \"Test\" with (force)").as_deref(),
            Some("Test")
        );
        assert_eq!(drops_database(b"drop table x"), None);
        assert_eq!(deallocates(b"select 1"), None);
    }

    #[test]
    fn only_a_begin_without_options_is_plain() {
        for (sql, tag) in [
            ("BEGIN", "BEGIN"),
            ("begin;", "BEGIN"),
            ("  Begin Work ; ", "BEGIN"),
            ("BEGIN TRANSACTION", "BEGIN"),
            ("start transaction;", "START TRANSACTION"),
        ] {
            assert_eq!(plain_begin(sql.as_bytes()), Some(tag), "{sql}");
        }
        for sql in [
            "BEGIN ISOLATION LEVEL SERIALIZABLE",
            "begin read write",
            "START TRANSACTION READ ONLY",
            "begin; select 1",
            "BEGINNING",
            "begin work now",
            "/* x */ begin",
            "COMMIT",
            "",
        ] {
            assert_eq!(plain_begin(sql.as_bytes()), None, "{sql}");
        }
    }

    #[test]
    fn tracked_values_differ_only_where_the_first_has_a_value() {
        let mut client = Tracked::default();
        let mut server = Tracked::default();
        assert!(client.set("timezone", "UTC"));
        assert!(client.set("application_name", "web"));
        assert!(!client.set("search_path", "x"));
        assert!(server.set("TimeZone", "UTC"));
        assert!(server.set("DateStyle", "ISO, MDY"));
        assert_eq!(client.differing(&server), vec![("application_name", "web")]);
        server.set("application_name", "web");
        assert!(client.differing(&server).is_empty());
    }

    #[test]
    fn set_queries_quote_values() {
        assert_eq!(
            set_query(&[("TimeZone", "UTC"), ("application_name", "it's")]),
            "SET TimeZone TO 'UTC'; SET application_name TO 'it''s'"
        );
        assert_eq!(tracked("timezone"), Some("TimeZone"));
        assert_eq!(tracked("search_path"), None);
    }
}
