//! Prompt parsing (SPEC section 2): the phrasings of GenEval, T2I-CompBench and VISOR, several
//! relations in one prompt, adjectives, multi-word objects, no relation, odd spacing; and the
//! object words' token positions on the tiny SD2.1 fixture's tokenizer.

use std::path::Path;

use steer::steering::prompt::{
    head_noun, parse_relations, triplet_token_indices, Relation, Triplet,
};
use steer::tokenizer::Tokenizer;

use Relation::{Above, Below, LeftOf, RightOf};

/// (prompt, expected (subject, relation, object) triplets in order).
type Case = (
    &'static str,
    &'static [(&'static str, Relation, &'static str)],
);

const CASES: &[Case] = &[
    // Left / right, every phrasing.
    ("a dog to the left of a cat", &[("dog", LeftOf, "cat")]),
    ("a dog left of a cat", &[("dog", LeftOf, "cat")]),
    ("a dog on the left of a cat", &[("dog", LeftOf, "cat")]),
    ("a dog on the left side of a cat", &[("dog", LeftOf, "cat")]),
    ("a dog to the left side of a cat", &[("dog", LeftOf, "cat")]),
    ("a dog at the left of a cat", &[("dog", LeftOf, "cat")]),
    ("a dog to left of a cat", &[("dog", LeftOf, "cat")]),
    (
        "a dog on the left-hand side of a cat",
        &[("dog", LeftOf, "cat")],
    ),
    (
        "a dog on the left hand side of a cat",
        &[("dog", LeftOf, "cat")],
    ),
    ("a dog to the right of a cat", &[("dog", RightOf, "cat")]),
    ("a dog right of a cat", &[("dog", RightOf, "cat")]),
    ("a dog on the right of a cat", &[("dog", RightOf, "cat")]),
    (
        "a dog on the right side of a cat",
        &[("dog", RightOf, "cat")],
    ),
    (
        "a dog to the right-hand side of a cat",
        &[("dog", RightOf, "cat")],
    ),
    // Above / below, every phrasing.
    ("a dog above a cat", &[("dog", Above, "cat")]),
    ("a dog on top of a cat", &[("dog", Above, "cat")]),
    ("a dog on the top of a cat", &[("dog", Above, "cat")]),
    ("a dog at the top of a cat", &[("dog", Above, "cat")]),
    ("a dog over a cat", &[("dog", Above, "cat")]),
    ("a dog atop a cat", &[("dog", Above, "cat")]),
    ("a dog below a cat", &[("dog", Below, "cat")]),
    ("a dog under a cat", &[("dog", Below, "cat")]),
    ("a dog beneath a cat", &[("dog", Below, "cat")]),
    ("a dog underneath a cat", &[("dog", Below, "cat")]),
    ("a dog on the bottom of a cat", &[("dog", Below, "cat")]),
    ("a dog on bottom of a cat", &[("dog", Below, "cat")]),
    ("a dog at the bottom of a cat", &[("dog", Below, "cat")]),
    // Benchmarks' templates: GenEval, T2I-CompBench, VISOR.
    ("a photo of a dog left of a cat", &[("dog", LeftOf, "cat")]),
    (
        "a photo of a fire hydrant right of a teddy bear",
        &[("fire hydrant", RightOf, "teddy bear")],
    ),
    (
        "a photo of an umbrella above a car",
        &[("umbrella", Above, "car")],
    ),
    ("a photo of a tv below a couch", &[("tv", Below, "couch")]),
    (
        "a balloon on the top of a giraffe",
        &[("balloon", Above, "giraffe")],
    ),
    (
        "a mouse on the bottom of a bird",
        &[("mouse", Below, "bird")],
    ),
    (
        "a chair on the left of a cake",
        &[("chair", LeftOf, "cake")],
    ),
    ("a bee on the right of a car", &[("bee", RightOf, "car")]),
    (
        "an oven to the right of a horse",
        &[("oven", RightOf, "horse")],
    ),
    // Intros.
    ("an image of a dog above a cat", &[("dog", Above, "cat")]),
    ("A photo of a dog below a cat", &[("dog", Below, "cat")]),
    (
        "a picture of the dog under the cat",
        &[("dog", Below, "cat")],
    ),
    (
        "a hyper-realistic digital painting of a cat on top of a dog",
        &[("cat", Above, "dog")],
    ),
    ("a painting above a sofa", &[("painting", Above, "sofa")]),
    // Several relations.
    (
        "a cat above a dog and a dog to the left of a car",
        &[("cat", Above, "dog"), ("dog", LeftOf, "car")],
    ),
    (
        "a cat above a dog, a bird below a car",
        &[("cat", Above, "dog"), ("bird", Below, "car")],
    ),
    (
        "a cat above a dog; a bird right of a car. a cup under a lamp",
        &[
            ("cat", Above, "dog"),
            ("bird", RightOf, "car"),
            ("cup", Below, "lamp"),
        ],
    ),
    (
        "a cat above a dog to the right of a car",
        &[("cat", Above, "dog"), ("dog", RightOf, "car")],
    ),
    (
        "cat above dog left of car",
        &[("cat", Above, "dog"), ("dog", LeftOf, "car")],
    ),
    (
        "a cat to the left of a dog and above a car",
        &[("cat", LeftOf, "dog"), ("cat", Above, "car")],
    ),
    (
        "a cat above and to the left of a dog",
        &[("cat", Above, "dog"), ("cat", LeftOf, "dog")],
    ),
    (
        "a cat above a dog, below a car",
        &[("cat", Above, "dog"), ("dog", Below, "car")],
    ),
    (
        "a dog to the left of the cat on top of a table",
        &[("dog", LeftOf, "cat"), ("cat", Above, "table")],
    ),
    // Adjectives (names drop listed attribute adjectives; phrases keep them).
    (
        "a red circle to the left of a blue square",
        &[("circle", LeftOf, "square")],
    ),
    (
        "a big fluffy white dog under a small wooden table",
        &[("dog", Below, "table")],
    ),
    (
        "a photo of an orange traffic light to the right of a white toilet",
        &[("traffic light", RightOf, "toilet")],
    ),
    ("an orange above a banana", &[("orange", Above, "banana")]),
    (
        "a red square above a green circle",
        &[("square", Above, "circle")],
    ),
    ("a sleepy dog above a cat", &[("sleepy dog", Above, "cat")]),
    // Multi-word and hyphenated names.
    (
        "a teddy bear to the right of a fire hydrant",
        &[("teddy bear", RightOf, "fire hydrant")],
    ),
    (
        "a hot dog above a stop sign",
        &[("hot dog", Above, "stop sign")],
    ),
    (
        "a shiny teddy bear above a red fire hydrant",
        &[("teddy bear", Above, "fire hydrant")],
    ),
    (
        "a sci-fi robot left of a t-shirt",
        &[("sci-fi robot", LeftOf, "t-shirt")],
    ),
    // Numbers and plurals.
    ("two dogs above three cats", &[("dogs", Above, "cats")]),
    ("a photo of 2 dogs below 3 cats", &[("dogs", Below, "cats")]),
    // Linking verbs and participles.
    (
        "the dog is to the left of the cat",
        &[("dog", LeftOf, "cat")],
    ),
    ("a cat is sitting above a dog", &[("cat", Above, "dog")]),
    (
        "there is a cat that is directly below a dog",
        &[("cat", Below, "dog")],
    ),
    ("a dog jumping over a fence", &[("dog", Above, "fence")]),
    (
        "a cat above a dog sleeping on a rug",
        &[("cat", Above, "dog")],
    ),
    (
        "a bird above a tall building",
        &[("bird", Above, "building")],
    ),
    // Case, spacing, punctuation.
    ("A Dog To The Left Of A Cat", &[("dog", LeftOf, "cat")]),
    ("A DOG ABOVE A CAT", &[("dog", Above, "cat")]),
    (
        "  a   dog \t to  the   left\nof a   cat.  ",
        &[("dog", LeftOf, "cat")],
    ),
    ("a dog, to the left of a cat!", &[("dog", LeftOf, "cat")]),
    ("(a dog) above (a cat)", &[("dog", Above, "cat")]),
    (
        "\"a dog\" to the left of 'a cat'",
        &[("dog", LeftOf, "cat")],
    ),
    ("a dog's bowl above a cat", &[("dog's bowl", Above, "cat")]),
    ("a dog above a cat...", &[("dog", Above, "cat")]),
    ("a dog above a dog", &[("dog", Above, "dog")]),
    // No relation.
    ("a photo of a dog", &[]),
    ("", &[]),
    ("   ", &[]),
    ("a dog next to a cat", &[]),
    ("a dog in front of a cat", &[]),
    ("a dog behind a cat", &[]),
    ("a dog near a cat", &[]),
    ("a dog on the left", &[]),
    ("a dog above", &[]),
    ("above a cat", &[]),
    ("left", &[]),
    ("the left side of the road", &[]),
    ("a book above-left of a laptop", &[]),
    ("a leftover pizza on a plate", &[]),
];

fn normalised(s: &str) -> String {
    s.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

#[test]
fn phrasing_table() {
    let mut failures = Vec::new();
    for &(prompt, expected) in CASES {
        let got = parse_relations(prompt);
        let got_short: Vec<(&str, Relation, &str)> = got
            .iter()
            .map(|t| (t.subject.as_str(), t.relation, t.object.as_str()))
            .collect();
        if got_short != expected {
            failures.push(format!(
                "{prompt:?}: got {got_short:?}, expected {expected:?}"
            ));
            continue;
        }
        // The spans locate the names in the prompt.
        for t in &got {
            for (name, span) in [(&t.subject, &t.subject_span), (&t.object, &t.object_span)] {
                let at = prompt.get(span.clone()).map(normalised);
                if at.as_deref() != Some(name.as_str()) {
                    failures.push(format!(
                        "{prompt:?}: span {span:?} of {name:?} reads {at:?}"
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

fn only(prompt: &str) -> Triplet {
    let mut ts = parse_relations(prompt);
    assert_eq!(ts.len(), 1, "{prompt:?}: {ts:?}");
    ts.remove(0)
}

#[test]
fn phrases_keep_adjectives_names_drop_them() {
    let t = only("a photo of a big red circle to the left of the blue teddy bear");
    assert_eq!(t.subject_phrase, "big red circle");
    assert_eq!(t.subject, "circle");
    assert_eq!(t.object_phrase, "blue teddy bear");
    assert_eq!(t.object, "teddy bear");
    assert_eq!((t.subject_head(), t.object_head()), ("circle", "bear"));
    assert_eq!(head_noun("fire hydrant"), "hydrant");
    assert_eq!(head_noun("dog"), "dog");
    assert_eq!(head_noun(""), "");
    assert_eq!(t.to_string(), "(circle, to the left of, teddy bear)");
}

#[test]
fn spans_point_at_each_occurrence() {
    let prompt = "a dog above a dog";
    let t = only(prompt);
    assert_eq!(
        (t.subject_span.clone(), t.object_span.clone()),
        (2..5, 14..17)
    );

    let prompt = "a cat above a dog and a dog to the left of a car";
    let ts = parse_relations(prompt);
    assert_eq!(ts[0].object_span, 14..17);
    assert_eq!(ts[1].subject_span, 24..27);

    // Original case and byte offsets, also after multi-byte characters.
    let prompt = "Café: A Dog  ABOVE a Cat";
    let t = only(prompt);
    assert_eq!(&prompt[t.subject_span.clone()], "Dog");
    assert_eq!(&prompt[t.object_span.clone()], "Cat");
    let prompt = "a   teddy    bear above a cat";
    let t = only(prompt);
    assert_eq!(t.subject, "teddy bear");
    assert_eq!(&prompt[t.subject_span.clone()], "teddy    bear");
}

#[test]
fn relation_names() {
    let names: Vec<&str> = Relation::ALL.iter().map(|r| r.name()).collect();
    assert_eq!(
        names,
        ["above", "below", "to the left of", "to the right of"]
    );
    for r in Relation::ALL {
        assert_eq!(Relation::from_name(r.name()), Some(r));
        assert_eq!(r.name().parse::<Relation>().unwrap(), r);
        assert_eq!(r.inverse().inverse(), r);
        assert_ne!(r.inverse(), r);
        assert_eq!(r.to_string(), r.name());
    }
    assert_eq!(Relation::from_name("  To  the LEFT of "), Some(LeftOf));
    assert_eq!(Relation::from_name("left of"), Some(LeftOf));
    assert_eq!(Relation::from_name("on top of"), Some(Above));
    assert_eq!(Relation::from_name("under"), Some(Below));
    assert_eq!(Relation::from_name("on the right side of"), Some(RightOf));
    assert_eq!(Relation::from_name("is"), None);
    assert_eq!(Relation::from_name("next to"), None);
    assert_eq!(Relation::from_name(""), None);
    let err = "behind".parse::<Relation>().unwrap_err().to_string();
    assert!(err.contains("behind"), "{err}");
}

fn tokenizer() -> Tokenizer {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sd21/tokenizer");
    Tokenizer::from_dir(dir).unwrap_or_else(|e| panic!("{e}"))
}

fn indices(tok: &Tokenizer, prompt: &str) -> Vec<(Vec<usize>, Vec<usize>)> {
    parse_relations(prompt)
        .iter()
        .map(|t| triplet_token_indices(tok, prompt, t).unwrap_or_else(|e| panic!("{e}")))
        .collect()
}

#[test]
fn token_indices_on_the_fixture_tokenizer() {
    let tok = tokenizer();
    // [bos] a photo of a dog to the left of a teddy bear [eos]
    //   0   1   2    3  4  5  6  7   8   9  10  11   12
    let prompt = "a photo of a dog to the left of a teddy bear";
    assert_eq!(indices(&tok, prompt), [(vec![5], vec![11, 12])]);
    assert_eq!(
        tok.word_token_indices(prompt, "teddy bear").unwrap(),
        [11, 12]
    );

    // The same word twice: each from its own occurrence.
    assert_eq!(indices(&tok, "a dog above a dog"), [(vec![2], vec![5])]);
    // [bos] a dog above a cat , a cat below a dog
    //   0   1  2    3   4  5  6 7  8    9   10 11
    assert_eq!(
        indices(&tok, "a dog above a cat, a cat below a dog"),
        [(vec![2], vec![5]), (vec![8], vec![11])]
    );

    // Adjectives are not part of the name; case and spacing do not matter.
    // [bos] a red circle above a blue square
    assert_eq!(
        indices(&tok, "A  Red   circle ABOVE a blue square"),
        [(vec![3], vec![7])]
    );
}

#[test]
fn token_indices_of_words_of_several_tokens() {
    let tok = tokenizer();
    // "zebra" and "and" are not in the tiny vocabulary: several tokens each.
    let prompt = "a zebra above a cat and a cat to the left of a zebra";
    let enc = tok.encode(prompt).unwrap();
    let tokens_of = |text: &str, nth: usize| -> Vec<usize> {
        enc.words
            .iter()
            .filter(|w| w.text == text)
            .nth(nth)
            .unwrap()
            .tokens
            .clone()
            .collect()
    };
    let zebra = tokens_of("zebra", 0);
    assert!(zebra.len() > 1, "{zebra:?}");
    assert_eq!(zebra[0], 2);
    let got = indices(&tok, prompt);
    assert_eq!(
        got,
        [
            (zebra.clone(), tokens_of("cat", 0)),
            (tokens_of("cat", 1), tokens_of("zebra", 1)),
        ]
    );
    // The first occurrence agrees with the tokenizer's own lookup.
    assert_eq!(tok.word_token_indices(prompt, "zebra").unwrap(), zebra);
    assert_ne!(tokens_of("zebra", 0), tokens_of("zebra", 1));
}

#[test]
fn token_indices_past_the_length_limit_are_an_error() {
    let tok = tokenizer();
    let prompt = format!("{} a dog above a cat", "a photo of a dog, ".repeat(20));
    let triplets = parse_relations(&prompt);
    assert_eq!(triplets.len(), 1);
    let err = triplet_token_indices(&tok, &prompt, &triplets[0])
        .unwrap_err()
        .to_string();
    assert!(err.contains("token limit"), "{err}");
    assert!(err.contains("dog"), "{err}");
}
