//! Turning operator input into platform accounts: the `platform import` CSV and
//! SCRAM key derivation spread over all cores (100,000 platforms in under a minute).

use crate::jid::normalize_local;
use crate::sasl::derive_credentials;
use crate::store::{now_secs, Account};

/// One CSV row of `platform import`: `name,password,roles,templates`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportRow {
    pub name: String,
    /// Empty: a certificate-only platform.
    pub password: String,
    pub roles: Vec<String>,
    pub templates: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImportError {
    #[error("line 1: the header must be `name,password,roles,templates`")]
    Header,
    #[error("line {line}: {message}")]
    Row { line: usize, message: String },
}

/// Parses the import CSV (RFC 4180 quoting; roles and templates separated by `;`).
pub fn parse_csv(text: &str) -> Result<Vec<ImportRow>, ImportError> {
    let mut lines = text.lines().enumerate();
    let header = lines.next().map(|(_, l)| split_csv(l)).ok_or(ImportError::Header)?;
    let header: Vec<String> = header.map_err(|_| ImportError::Header)?.iter().map(|s| s.trim().to_lowercase()).collect();
    if header != ["name", "password", "roles", "templates"] {
        return Err(ImportError::Header);
    }
    let mut rows = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (i, line) in lines {
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let f = split_csv(line).map_err(|message| ImportError::Row { line: line_no, message })?;
        if f.len() != 4 {
            return Err(ImportError::Row { line: line_no, message: format!("expected 4 fields, found {}", f.len()) });
        }
        let name = normalize_local(f[0].trim())
            .map_err(|e| ImportError::Row { line: line_no, message: format!("name {:?}: {e}", f[0]) })?;
        if !seen.insert(name.clone()) {
            return Err(ImportError::Row { line: line_no, message: format!("platform {name} appears twice") });
        }
        let list = |s: &str| s.split(';').map(str::trim).filter(|x| !x.is_empty()).map(String::from).collect();
        rows.push(ImportRow { name, password: f[1].clone(), roles: list(&f[2]), templates: list(&f[3]) });
    }
    Ok(rows)
}

/// Splits one CSV line, honouring double quotes (`""` inside quotes is a quote).
fn split_csv(line: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = line.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                cur.push('"');
            }
            (true, '"') => quoted = false,
            (false, '"') if cur.is_empty() => quoted = true,
            (false, ',') => out.push(std::mem::take(&mut cur)),
            (_, c) => cur.push(c),
        }
    }
    if quoted {
        return Err("unterminated quoted field".into());
    }
    out.push(cur);
    Ok(out)
}

/// Builds accounts, deriving SCRAM keys on every core.
pub fn accounts(rows: Vec<ImportRow>, read_only: bool, iterations: u32) -> Result<Vec<(String, Account)>, String> {
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).max(1);
    let chunk = rows.len().div_ceil(threads).max(1);
    let created = now_secs();
    let results: Vec<Result<Vec<(String, Account)>, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = rows
            .chunks(chunk)
            .map(|part| {
                s.spawn(move || {
                    part.iter()
                        .map(|r| {
                            let credentials = if r.password.is_empty() {
                                None
                            } else {
                                Some(derive_credentials(&r.password, iterations).map_err(|e| format!("{}: {e}", r.name))?)
                            };
                            Ok((
                                r.name.clone(),
                                Account {
                                    credentials,
                                    roles: r.roles.clone(),
                                    templates: r.templates.clone(),
                                    read_only,
                                    revoked: false,
                                    cert_serials: Vec::new(),
                                    created,
                                },
                            ))
                        })
                        .collect()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("key derivation thread panicked".into()))).collect()
    });
    let mut out = Vec::with_capacity(rows.len());
    for r in results {
        out.extend(r?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_with_quotes_roles_and_empty_password_parses() {
        let rows = parse_csv("name,password,roles,templates\nSensor1,\"p,w\"\"x\",publisher;subscriber,ids-sensor\ncmdb,,,\n").unwrap();
        assert_eq!(rows[0].name, "sensor1");
        assert_eq!(rows[0].password, "p,w\"x");
        assert_eq!(rows[0].roles, vec!["publisher", "subscriber"]);
        assert_eq!(rows[0].templates, vec!["ids-sensor"]);
        assert_eq!(rows[1].password, "");
        assert!(rows[1].roles.is_empty());
    }

    #[test]
    fn bad_header_duplicates_and_bad_names_name_the_line() {
        assert_eq!(parse_csv("user,pass\n"), Err(ImportError::Header));
        let e = parse_csv("name,password,roles,templates\na,x,,\nA,y,,\n").unwrap_err();
        assert!(matches!(e, ImportError::Row { line: 3, .. }), "{e}");
        let e = parse_csv("name,password,roles,templates\nbad name,x,,\n").unwrap_err();
        assert!(matches!(e, ImportError::Row { line: 2, .. }), "{e}");
        let e = parse_csv("name,password,roles,templates\na,x\n").unwrap_err();
        assert!(matches!(e, ImportError::Row { line: 2, .. }), "{e}");
    }

    #[test]
    fn certificate_only_rows_get_no_credentials() {
        let rows = parse_csv("name,password,roles,templates\na,secret,,\nb,,,\n").unwrap();
        let acc = accounts(rows, false, 4096).unwrap();
        assert!(acc[0].1.credentials.is_some());
        assert!(acc[1].1.credentials.is_none());
    }
}
