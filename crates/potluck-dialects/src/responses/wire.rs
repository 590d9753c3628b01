//! responses: how a response object is written. The request's `tools`, echoed in every
//! response object, stay the request's JSON text ([`JsonText`]): a derived struct writes
//! them between the object's other fields, so that no JSON tree of them is made (writing
//! a `RawValue` into a `serde_json::Value` parses it again, and a tree of a large `tools`
//! takes tens of times its bytes).

use serde::ser::{Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::JsonText;

/// The field of a response object that holds the request's tools: a null placeholder in
/// the object's `Value`, where [`WithTools`] writes the text.
pub(super) const TOOLS: &str = "tools";
/// The field of an event that holds its response object.
pub(super) const RESPONSE: &str = "response";

/// A run of a JSON object's fields, written in order (a flattened part of a derived
/// struct, around the field the struct writes itself).
pub(super) struct Fields<'a> {
    object: Option<&'a Map<String, Value>>,
    from: usize,
    to: usize,
}

impl Serialize for Fields<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let n = self.to.saturating_sub(self.from);
        s.collect_map(self.object.into_iter().flatten().skip(self.from).take(n))
    }
}

/// The fields of `object` before `key` and after it (`key` itself left out). Without
/// `key`, all of them come before.
fn around<'a>(object: &'a Value, key: &str) -> (Fields<'a>, Fields<'a>) {
    let object = object.as_object();
    let len = object.map_or(0, Map::len);
    let at = object.and_then(|o| o.keys().position(|k| k == key));
    let before = Fields {
        object,
        from: 0,
        to: at.unwrap_or(len),
    };
    let after = Fields {
        object,
        from: at.map_or(len, |i| i.saturating_add(1)),
        to: len,
    };
    (before, after)
}

/// A response object: its fields, with the request's tools written in the place of the
/// [`TOOLS`] placeholder.
#[derive(serde::Serialize)]
pub(super) struct WithTools<'a> {
    #[serde(flatten)]
    before: Fields<'a>,
    tools: &'a RawValue,
    #[serde(flatten)]
    after: Fields<'a>,
}

impl<'a> WithTools<'a> {
    pub(super) fn new(object: &'a Value, tools: &'a JsonText) -> Self {
        let (before, after) = around(object, TOOLS);
        Self {
            before,
            tools: tools.raw(),
            after,
        }
    }
}

/// An event's data: its fields, with its [`RESPONSE`] object written as [`WithTools`].
#[derive(serde::Serialize)]
pub(super) struct WithResponse<'a> {
    #[serde(flatten)]
    before: Fields<'a>,
    response: WithTools<'a>,
    #[serde(flatten)]
    after: Fields<'a>,
}

impl<'a> WithResponse<'a> {
    pub(super) fn new(data: &'a Value, tools: &'a JsonText) -> Self {
        let (before, after) = around(data, RESPONSE);
        let response = data.get(RESPONSE).unwrap_or(&Value::Null);
        Self {
            before,
            response: WithTools::new(response, tools),
            after,
        }
    }
}
