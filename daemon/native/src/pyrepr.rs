//! Python's `repr()` of the values error messages quote, so a message from this core reads
//! like the Python path's (`input 'x': ...`, `['a', 'b']`).

use std::fmt::Write;

/// `repr(s)` for a Python str: single quotes unless the text has a ' and no ", backslash
/// escapes for the quote, `\\`, `\n`, `\r`, `\t`, other control characters as `\xNN`.
/// Printable non-ASCII is kept as is (Python's `isprintable` is approximated by "not a control
/// character").
pub fn str(s: &str) -> String {
    let q = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(q);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == q => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || (0x7f..0xa0).contains(&(c as u32)) => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push(q);
    out
}

/// `repr(list_of_str)`.
pub fn str_list<'a>(items: impl IntoIterator<Item = &'a str>) -> String {
    let parts: Vec<String> = items.into_iter().map(str).collect();
    format!("[{}]", parts.join(", "))
}

/// `repr(list_of_int)`.
pub fn int_list<T: std::fmt::Display>(items: impl IntoIterator<Item = T>) -> String {
    let parts: Vec<String> = items.into_iter().map(|v| v.to_string()).collect();
    format!("[{}]", parts.join(", "))
}

#[cfg(test)]
mod tests {
    #[test]
    fn quotes_like_python() {
        assert_eq!(super::str("x"), "'x'");
        assert_eq!(super::str("it's"), "\"it's\"");
        assert_eq!(super::str("a'\""), "'a\\'\"'");
        assert_eq!(super::str("a\nb\\\x01"), "'a\\nb\\\\\\x01'");
        assert_eq!(super::str_list(["a", "b"]), "['a', 'b']");
        assert_eq!(super::int_list([1i128, -2]), "[1, -2]");
        assert_eq!(super::int_list(Vec::<u64>::new()), "[]");
    }
}
