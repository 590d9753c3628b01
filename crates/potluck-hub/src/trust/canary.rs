//! Canary prompts, generated rather than drawn from a list a provider could learn: a
//! template, one or two topics, an audience and numbers give tens of thousands of
//! ordinary-looking questions, and the body around them takes the *shape* of recent
//! sampled consumer requests (temperature, `max_tokens`, streamed or not; never their
//! content), with a fresh seed like every request the hub forwards.

use std::collections::VecDeque;

use rand::seq::IndexedRandom;
use rand::Rng;
use serde_json::{json, Value};

/// Shapes of recent sampled requests remembered for canaries.
pub(crate) const SHAPES_KEPT: usize = 64;

const TEMPLATES: &[&str] = &[
    "Write {n} sentences about {topic}.",
    "List {n} facts about {topic}.",
    "Explain {topic} to {audience}.",
    "Give me {n} tips about {topic} for {audience}.",
    "What are the pros and cons of {topic}?",
    "Summarize what you know about {topic} in {n} bullet points.",
    "Why does {topic} matter to {audience}?",
    "Describe {topic} in about {words} words.",
    "Write a short poem about {topic}.",
    "Compare {topic} and {other}.",
    "How would you teach {topic} to {audience}?",
    "Tell me {n} common mistakes people make with {topic}.",
    "Give a one-paragraph history of {topic}.",
    "Suggest {n} questions {audience} might ask about {topic}.",
    "What is the connection between {topic} and {other}?",
    "Plan a {n}-step introduction to {topic} for {audience}.",
];

const TOPICS: &[&str] = &[
    "the water cycle",
    "sourdough bread",
    "public libraries",
    "electric bicycles",
    "composting",
    "black holes",
    "the Roman calendar",
    "volcanoes",
    "houseplants",
    "chess openings",
    "solar panels",
    "bird migration",
    "coffee roasting",
    "the printing press",
    "tide pools",
    "spreadsheets",
    "jazz improvisation",
    "honeybees",
    "rainwater harvesting",
    "the metric system",
    "lighthouses",
    "knitting",
    "weather forecasting",
    "board games",
    "recycling plastics",
    "the human heart",
    "train timetables",
    "origami",
    "desert plants",
    "password managers",
    "marathon training",
    "tea ceremonies",
    "glaciers",
    "vaccines",
    "urban gardening",
    "the moon's phases",
    "bread yeast",
    "wind turbines",
    "coral reefs",
    "budgeting",
    "photosynthesis",
    "ancient maps",
    "sleep hygiene",
    "bridges",
    "mushrooms",
    "hash functions",
    "the postal service",
    "sailing knots",
];

const AUDIENCES: &[&str] = &[
    "a ten-year-old",
    "a new employee",
    "a retired teacher",
    "a beginner programmer",
    "a busy parent",
    "a university student",
    "a tourist",
    "a small business owner",
    "my grandmother",
    "a curious friend",
];

/// How a question may open (consumers are not uniform either).
const OPENERS: &[&str] = &[
    "",
    "",
    "Please: ",
    "Quick question. ",
    "Hi! ",
    "I was wondering: ",
    "Could you help? ",
    "For a project: ",
];

const SYSTEM: &[&str] = &[
    "You are a helpful assistant.",
    "Answer concisely.",
    "You are a friendly tutor.",
    "Be clear and accurate.",
];

/// Temperatures drawn when no consumer shape is known yet (`None`: unset).
const TEMPERATURES: &[Option<f64>] = &[
    None,
    Some(0.0),
    Some(0.2),
    Some(0.5),
    Some(0.7),
    Some(0.8),
    Some(1.0),
];

/// The shape of one sampled request (no content).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Shape {
    temperature: Option<f64>,
    max_tokens: Option<u64>,
    stream: bool,
}

impl Shape {
    /// The shape of a forwarded body (`None` if it is not a JSON object).
    pub(crate) fn of(body: &[u8]) -> Option<Self> {
        #[derive(serde::Deserialize)]
        struct S {
            temperature: Option<f64>,
            max_tokens: Option<u64>,
            max_completion_tokens: Option<u64>,
            stream: Option<bool>,
        }
        let s: S = serde_json::from_slice(body).ok()?;
        Some(Self {
            temperature: s.temperature,
            max_tokens: s.max_tokens.or(s.max_completion_tokens),
            stream: s.stream.unwrap_or(false),
        })
    }
}

/// Recent shapes, oldest dropped first.
#[derive(Debug, Default)]
pub(crate) struct Shapes(VecDeque<Shape>);

impl Shapes {
    /// Remember a sampled request's shape.
    pub(crate) fn note(&mut self, s: Shape) {
        if self.0.len() >= SHAPES_KEPT {
            self.0.pop_front();
        }
        self.0.push_back(s);
    }

    fn draw(&self, rng: &mut impl Rng, max_tokens: u64) -> Shape {
        let (a, b) = self.0.as_slices();
        let known = [a, b].concat();
        known.choose(rng).copied().unwrap_or_else(|| Shape {
            temperature: *TEMPERATURES.choose(rng).unwrap_or(&None),
            max_tokens: Some(rng.random_range(max_tokens / 4..=max_tokens).max(1)),
            stream: rng.random_bool(0.5),
        })
    }
}

/// A generated question.
pub(crate) fn prompt(rng: &mut impl Rng) -> String {
    let pick = |rng: &mut _, list: &[&'static str]| *list.choose(rng).unwrap_or(&"");
    let template = pick(rng, TEMPLATES);
    let topic = pick(rng, TOPICS);
    let mut other = pick(rng, TOPICS);
    if other == topic {
        other = TOPICS[(TOPICS.iter().position(|t| *t == topic).unwrap_or(0) + 1) % TOPICS.len()];
    }
    let opener = pick(rng, OPENERS);
    let question = template
        .replace("{topic}", topic)
        .replace("{other}", other)
        .replace("{audience}", pick(rng, AUDIENCES))
        .replace("{n}", &rng.random_range(2..=7).to_string())
        .replace("{words}", &(rng.random_range(4..=15) * 10).to_string());
    format!("{opener}{question}")
}

/// A canary's chat body for `model`: a generated question, sometimes after a system
/// message, in the shape of a recent consumer request, with a fresh seed and at most
/// `max_tokens` (`audit.canary_max_tokens`) to generate.
pub(crate) fn body(rng: &mut impl Rng, shapes: &Shapes, model: &str, max_tokens: u64) -> Value {
    let shape = shapes.draw(rng, max_tokens);
    let mut messages = Vec::new();
    if rng.random_bool(0.3) {
        messages.push(json!({"role": "system", "content": *SYSTEM.choose(rng).unwrap_or(&"")}));
    }
    messages.push(json!({"role": "user", "content": prompt(rng)}));
    let mut v = json!({"model": model, "messages": messages});
    let o = v.as_object_mut();
    if let Some(o) = o {
        if let Some(t) = shape.temperature {
            o.insert("temperature".into(), json!(t));
        }
        let limit = shape.max_tokens.unwrap_or(max_tokens).clamp(1, max_tokens);
        o.insert("max_tokens".into(), json!(limit));
        if shape.stream {
            o.insert("stream".into(), json!(true));
            o.insert("stream_options".into(), json!({"include_usage": true}));
        }
        o.insert("seed".into(), json!(crate::routing::send::hub_seed()));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn prompts_are_many_and_never_a_placeholder() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let set: std::collections::HashSet<String> = (0..2000).map(|_| prompt(&mut rng)).collect();
        assert!(set.len() > 1800, "{} distinct of 2000", set.len());
        assert!(set.iter().all(|p| !p.contains('{')));
    }

    #[test]
    fn bodies_take_recent_shapes_and_a_seed() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let mut shapes = Shapes::default();
        let seen = Shape::of(br#"{"temperature":0.9,"max_tokens":40,"stream":true}"#).unwrap();
        shapes.note(seen);
        let v = body(&mut rng, &shapes, "m", 256);
        assert_eq!(v["temperature"], 0.9);
        assert_eq!(v["max_tokens"], 40);
        assert_eq!(v["stream"], true);
        assert!(v["seed"].is_u64());
        // Without shapes: still bounded by the cap, and a seed.
        let v = body(&mut rng, &Shapes::default(), "m", 256);
        assert!(v["max_tokens"].as_u64().unwrap() <= 256 && v["seed"].is_u64());
        for _ in 0..SHAPES_KEPT + 5 {
            shapes.note(seen);
        }
        assert_eq!(shapes.0.len(), SHAPES_KEPT);
    }
}
