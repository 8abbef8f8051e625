//! HuJSON (JSON with comments and trailing commas) read into jsonc-parser's syntax tree, with
//! byte offsets turned into line:col and helpers that walk objects the way the policy language
//! wants: case-insensitive keys, unknown keys refused, `null` read as absent.

use jsonc_parser::ast::{Array, Object, Value};
use jsonc_parser::common::Ranged;
use jsonc_parser::{CollectOptions, ParseOptions};

use super::error::{Place, PolicyError, Pos};

/// The policy text with a line index, to turn byte offsets into [`Pos`].
pub(crate) struct Doc<'t> {
    text: &'t str,
    line_starts: Vec<usize>,
}

impl<'t> Doc<'t> {
    pub(crate) fn new(text: &'t str) -> Self {
        let mut line_starts = vec![0];
        line_starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        Self { text, line_starts }
    }

    /// The line:col of a byte offset.
    pub(crate) fn pos(&self, offset: usize) -> Pos {
        let offset = offset.min(self.text.len());
        let line = self.line_starts.partition_point(|&s| s <= offset).max(1);
        let start = self.line_starts[line - 1];
        let col = self
            .text
            .get(start..offset)
            .map_or(offset - start, |s| s.chars().count());
        Pos {
            line: u32::try_from(line).unwrap_or(u32::MAX),
            col: u32::try_from(col + 1).unwrap_or(u32::MAX),
        }
    }

    /// Where a node starts.
    pub(crate) fn at(&self, node: &impl Ranged) -> Pos {
        self.pos(node.start())
    }
}

/// HuJSON's grammar: comments and trailing commas on top of JSON, nothing looser.
fn options() -> ParseOptions {
    ParseOptions {
        allow_comments: true,
        allow_trailing_commas: true,
        allow_loose_object_property_names: false,
        allow_missing_commas: false,
        allow_single_quoted_strings: false,
        allow_hexadecimal_numbers: false,
        allow_unary_plus_numbers: false,
        allow_bare_decimal_point_numbers: false,
        allow_non_finite_numbers: false,
        allow_extended_string_escapes: false,
    }
}

/// Parse the text; a syntax error names line and column.
pub(crate) fn parse<'t>(text: &'t str, doc: &Doc<'_>) -> Result<Value<'t>, PolicyError> {
    let parsed =
        jsonc_parser::parse_to_ast(text, &CollectOptions::default(), &options()).map_err(|e| {
            PolicyError::Syntax {
                at: Pos {
                    line: u32::try_from(e.line_display()).unwrap_or(u32::MAX),
                    col: u32::try_from(e.column_display()).unwrap_or(u32::MAX),
                },
                message: e.kind().to_string(),
            }
        })?;
    parsed
        .value
        .ok_or(PolicyError::NotAnObject { at: doc.pos(0) })
}

/// One recognised key of an object: its canonical name and value.
pub(crate) struct Field<'a, 't> {
    pub(crate) name: &'static str,
    pub(crate) key_at: Pos,
    pub(crate) value: &'a Value<'t>,
}

/// The recognised keys of `obj` (matched case-insensitively against `known`), in text order,
/// skipping `null` values. Unknown and repeated keys are errors; keys starting with `#` are
/// ignored when `skip_hash` (Tailscale's comment keys in rule objects).
pub(crate) fn fields<'a, 't>(
    doc: &Doc<'_>,
    obj: &'a Object<'t>,
    place: &Place,
    known: &[&'static str],
    skip_hash: bool,
) -> Result<Vec<Field<'a, 't>>, PolicyError> {
    let mut out: Vec<Field<'a, 't>> = Vec::with_capacity(obj.properties.len());
    for prop in &obj.properties {
        let key = prop.name.as_str();
        let key_at = doc.at(&prop.name);
        if skip_hash && key.starts_with('#') {
            continue;
        }
        let Some(name) = known.iter().find(|k| k.eq_ignore_ascii_case(key)) else {
            return Err(PolicyError::UnknownField {
                at: key_at,
                place: place.clone(),
                field: key.to_string(),
            });
        };
        if out.iter().any(|f| f.name == *name) {
            return Err(PolicyError::DuplicateField {
                at: key_at,
                place: place.clone(),
                field: key.to_string(),
            });
        }
        if matches!(prop.value, Value::NullKeyword(_)) {
            continue;
        }
        out.push(Field {
            name,
            key_at,
            value: &prop.value,
        });
    }
    Ok(out)
}

/// The value as an object.
pub(crate) fn object<'a, 't>(
    doc: &Doc<'_>,
    v: &'a Value<'t>,
    place: &Place,
) -> Result<&'a Object<'t>, PolicyError> {
    match v {
        Value::Object(o) => Ok(o),
        other => Err(wrong(doc, other, place, "an object")),
    }
}

/// The value as an array.
pub(crate) fn array<'a, 't>(
    doc: &Doc<'_>,
    v: &'a Value<'t>,
    place: &Place,
) -> Result<&'a Array<'t>, PolicyError> {
    match v {
        Value::Array(a) => Ok(a),
        other => Err(wrong(doc, other, place, "a list")),
    }
}

/// The value as a string with its position.
pub(crate) fn string(
    doc: &Doc<'_>,
    v: &Value<'_>,
    place: &Place,
) -> Result<(String, Pos), PolicyError> {
    match v {
        Value::StringLit(s) => Ok((s.value.to_string(), doc.at(s))),
        other => Err(wrong(doc, other, place, "a string")),
    }
}

/// The value as a list of strings with their positions (`null` elements refused).
pub(crate) fn strings(
    doc: &Doc<'_>,
    v: &Value<'_>,
    place: &Place,
) -> Result<Vec<(String, Pos)>, PolicyError> {
    let arr = match v {
        Value::Array(a) => a,
        other => return Err(wrong(doc, other, place, "a list of strings")),
    };
    arr.elements
        .iter()
        .map(|e| match e {
            Value::StringLit(s) => Ok((s.value.to_string(), doc.at(s))),
            other => Err(wrong(doc, other, place, "a list of strings")),
        })
        .collect()
}

/// A [`PolicyError::WrongType`] at `v`.
pub(crate) fn wrong(
    doc: &Doc<'_>,
    v: &Value<'_>,
    place: &Place,
    expected: &'static str,
) -> PolicyError {
    PolicyError::WrongType {
        at: doc.at(v),
        place: place.clone(),
        expected,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_count_lines_and_characters() {
        let doc = Doc::new("ab\ncdé\nf");
        assert_eq!(doc.pos(0), Pos { line: 1, col: 1 });
        assert_eq!(doc.pos(3), Pos { line: 2, col: 1 });
        assert_eq!(doc.pos(7), Pos { line: 2, col: 4 }, "é is one column");
        assert_eq!(doc.pos(8), Pos { line: 3, col: 1 });
    }

    #[test]
    fn comments_and_trailing_commas_parse_loose_forms_do_not() {
        let text = "// c\n{ /* b */ \"a\": [1, 2,], }";
        let doc = Doc::new(text);
        assert!(parse(text, &doc).is_ok());
        let text = "{\n  'a': 1 }";
        let doc = Doc::new(text);
        let err = parse(text, &doc).expect_err("single quotes are not HuJSON");
        assert!(
            matches!(
                err,
                PolicyError::Syntax {
                    at: Pos { line: 2, col: 3 },
                    ..
                }
            ),
            "{err:?}"
        );
    }
}
