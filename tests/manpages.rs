//! The man pages in `man/`, checked against the binaries they describe: each page renders with
//! groff without a single warning, has every section of [`SECTIONS`], and its OPTIONS section
//! has an entry (a `.TP` tag) for every option the binary's `--help` lists, and for nothing
//! else. A new option therefore fails here until it is documented, naming the option and the
//! page.
//!
//! Needs groff (Debian package groff-base). This file owns no other file.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A page and the binary whose options it documents.
struct Page {
    /// Relative to the crate root.
    file: &'static str,
    /// The name `--help` is run as, for the messages.
    bin: &'static str,
    exe: &'static str,
}

const PAGES: [Page; 2] = [
    Page {
        file: "man/aiopopd.8",
        bin: "aiopopd",
        exe: env!("CARGO_BIN_EXE_aiopopd"),
    },
    Page {
        file: "man/aiopopd-client.1",
        bin: "aiopopd-client",
        exe: env!("CARGO_BIN_EXE_aiopopd-client"),
    },
];

impl Page {
    fn path(&self) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(self.file)
    }

    fn source(&self) -> String {
        fs::read_to_string(self.path()).unwrap_or_else(|e| panic!("{}: {e}", self.file))
    }

    /// What `BIN --help` prints; it must succeed.
    fn help(&self) -> String {
        let out = Command::new(self.exe)
            .arg("--help")
            .output()
            .unwrap_or_else(|e| panic!("running {} --help: {e}", self.bin));
        assert!(
            out.status.success(),
            "{} --help: {}\n{}",
            self.bin,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("--help prints UTF-8")
    }
}

/// The sections every page must have, as headings of the rendered page.
const SECTIONS: [&str; 8] = [
    "NAME",
    "SYNOPSIS",
    "DESCRIPTION",
    "OPTIONS",
    "EXIT STATUS",
    "FILES",
    "EXAMPLES",
    "SEE ALSO",
];

fn groff() -> Command {
    let found = ["/usr/bin/groff", "/bin/groff"]
        .iter()
        .map(Path::new)
        .find(|p| p.exists());
    let Some(groff) = found else {
        panic!("groff not found: apt-get install groff-base");
    };
    Command::new(groff)
}

/// The page text as a reader sees it, enough to find option names: font changes (`\fB`,
/// `\f(CW`, `\f[BI]`), `\%` and `\&` removed, `\-` as `-`, `\e` as `\`.
fn normalise(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut chars = source.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('f') => match chars.next() {
                Some('(') => {
                    chars.next();
                    chars.next();
                }
                Some('[') => {
                    for c in chars.by_ref() {
                        if c == ']' {
                            break;
                        }
                    }
                }
                _ => {}
            },
            Some('-') => out.push('-'),
            Some('e') | Some('\\') => out.push('\\'),
            Some('%') | Some('&') => {}
            Some(other) => {
                out.push('\\');
                out.push(other);
            }
            None => out.push('\\'),
        }
    }
    out
}

/// Every option named in `text`: `--long-name`, and `-X` for a single ASCII letter X, each
/// standing as a word of its own (so `-s` is not found in `--imap-ssl`, nor `-SHA` in
/// `SCRAM-SHA-1`).
fn options_in(text: &str) -> BTreeSet<String> {
    let b = text.as_bytes();
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'-' || c == b'_';
    let mut found = BTreeSet::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'-' || (i > 0 && word(b[i - 1])) {
            i += 1;
            continue;
        }
        if b.get(i + 1) == Some(&b'-') && b.get(i + 2).is_some_and(u8::is_ascii_alphanumeric) {
            let mut end = i + 2;
            while end < b.len() && (b[end].is_ascii_alphanumeric() || b[end] == b'-') {
                end += 1;
            }
            found.insert(text[i..end].trim_end_matches('-').to_string());
            i = end;
        } else if b.get(i + 1).is_some_and(u8::is_ascii_alphabetic)
            && !b.get(i + 2).is_some_and(|&c| word(c))
        {
            found.insert(text[i..i + 2].to_string());
            i += 2;
        } else {
            i += 1;
        }
    }
    found
}

/// The options that have an entry in the page's OPTIONS section: those on the tag line after
/// each `.TP` (or `.TQ`), or on an `.IP` line, between `.SH OPTIONS` and the next `.SH`.
fn documented_options(page: &Page) -> BTreeSet<String> {
    let source = page.source();
    let mut lines = source
        .lines()
        .skip_while(|l| !matches!(l.trim(), ".SH OPTIONS" | ".SH \"OPTIONS\""));
    assert!(
        lines.next().is_some(),
        "{}: no `.SH OPTIONS` section",
        page.file
    );
    let mut tags = String::new();
    let mut tag_next = false;
    for line in lines.take_while(|l| !l.starts_with(".SH")) {
        if line.starts_with(".\\\"") || line.starts_with("'\\\"") {
            continue;
        }
        let macro_name = line.split_whitespace().next().unwrap_or("");
        if tag_next || macro_name == ".IP" {
            tags.push_str(line);
            tags.push('\n');
        }
        tag_next = matches!(macro_name, ".TP" | ".TQ");
    }
    options_in(&normalise(&tags))
}

#[test]
fn pages_render_without_warnings() {
    for page in &PAGES {
        let source = page.source();
        assert!(
            source.is_ascii(),
            "{}: use groff escapes (\\(lq, \\(em, ...) rather than non-ASCII characters",
            page.file
        );
        let out = groff()
            .args(["-man", "-Tutf8", "-ww", "-z"])
            .arg(page.path())
            .output()
            .expect("running groff");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.is_empty(),
            "groff -man -ww warns about {} ({}):\n{stderr}",
            page.file,
            out.status
        );
        // -P-cbou: plain text, without overstriking for bold and underline.
        let rendered = groff()
            .args(["-man", "-Tutf8", "-P-cbou"])
            .arg(page.path())
            .output()
            .expect("running groff");
        let text = String::from_utf8_lossy(&rendered.stdout);
        for section in SECTIONS {
            assert!(
                text.lines().any(|l| l.trim() == section),
                "{}: no {section} section in the rendered page",
                page.file
            );
        }
    }
}

#[test]
fn every_option_in_help_is_documented() {
    let mut missing = Vec::new();
    for page in &PAGES {
        let help = options_in(&page.help());
        assert!(
            help.contains("--help") && help.contains("-h"),
            "{} --help: found no options in it",
            page.bin
        );
        let documented = documented_options(page);
        for option in help.difference(&documented) {
            missing.push(format!(
                "{option} (listed by `{} --help`) has no entry in {}: add a .TP entry for it \
                 under .SH OPTIONS, written as {}",
                page.bin,
                page.file,
                option.replace('-', "\\-")
            ));
        }
    }
    assert!(missing.is_empty(), "\n{}", missing.join("\n"));
}

#[test]
fn every_documented_option_exists() {
    let mut stale = Vec::new();
    for page in &PAGES {
        let help = options_in(&page.help());
        for option in documented_options(page).difference(&help) {
            stale.push(format!(
                "{} documents {option} under OPTIONS, but `{} --help` doesn't list it: remove \
                 the entry, or add the option to the --help text",
                page.file, page.bin
            ));
        }
    }
    assert!(stale.is_empty(), "\n{}", stale.join("\n"));
}

#[test]
fn option_names_are_found_as_words() {
    let text = normalise(
        ".BR \\-s \", \" \\fB\\-\\-imap\\-ssl\\fR\nSCRAM-SHA-1 and -ERR [AUTH], (alias --path):\n\
         \\f(CW\\-\\-stls\\fP \\%\\-\\-user\\-dir\n",
    );
    let found: Vec<String> = options_in(&text).into_iter().collect();
    assert_eq!(
        found,
        ["--imap-ssl", "--path", "--stls", "--user-dir", "-s"]
    );
}
