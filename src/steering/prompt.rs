//! Prompt parsing: the (subject, relation, object) triplets that steering enforces (SPEC
//! section 2), and the token positions of their object words in the text encoder's tokenization
//! (SPEC section 3).
//!
//! A small rule-based parser, no language model: the prompt is split into words and punctuation,
//! the relation phrasings below are matched (longest first, case-insensitive), and each relation
//! takes the noun phrase just before it as its subject and the one just after it as its object.
//!
//! | Relation (class name)          | Phrasings accepted                                                                 |
//! |--------------------------------|------------------------------------------------------------------------------------|
//! | `to the left of`  ([`LeftOf`])  | to the left of, on the left of, at the left of, left of, to left of, on left of, (to / on / at) the left side of, left side of, (to / on / at) the left-hand side of, (to / on) the left hand side of |
//! | `to the right of` ([`RightOf`]) | the same with "right"                                                              |
//! | `above` ([`Above`])            | above, over, atop, on top of, on the top of, at the top of                          |
//! | `below` ([`Below`])            | below, under, beneath, underneath, on the bottom of, on bottom of, at the bottom of |
//!
//! Other spatial words ("next to", "near", "behind", "in front of") are not classifier classes:
//! they end a noun phrase and make no triplet. Diagonals written as one hyphenated word
//! ("above-left of") make none either; "A above and to the left of B" makes two.
//!
//! **Noun phrases.** A phrase is the run of ordinary words next to the relation: backwards from
//! it for the subject, forwards for the object, stopping at punctuation, another relation,
//! articles and other determiners ("a", "the", "two", "some", ...), conjunctions ("and",
//! "with", ...), prepositions ("of", "on", "in", "near", ...), pronouns, and verbs that link a
//! subject to its relation ("is", "sitting", "placed", ...; these are skipped between the subject
//! and the relation, as is an "-ing" word that follows a noun: "a dog jumping over a fence").
//! A leading "a photo of" / "an image of" / "a hyper-realistic digital painting of" (an article,
//! up to four words ending in a picture noun, then "of") is not part of any phrase. Brackets and
//! quotes are read as spaces; other punctuation ends a phrase.
//!
//! **Which words the maps use.** The classifier was trained on the maps of object *names* (GQA
//! names such as "teddy bear", put in prompts as "A {subject} {relation} a {object}"), and the
//! reference implementation keeps, at inference, only the nouns of each noun phrase ("red
//! circle" -> "circle", "teddy bear" -> "teddy bear"). Without a part-of-speech tagger we
//! approximate this: [`Triplet::subject`] / [`Triplet::object`] are the phrase with its leading
//! attribute adjectives removed, from a closed list of colours, sizes, materials and common
//! descriptors ("red", "big", "wooden", "striped", ...; never the phrase's last word). Compound
//! nouns stay whole ("teddy bear", "fire hydrant", "hot dog"); an adjective outside the list
//! stays in the name. The full phrase (adjectives included, determiners not) is kept in
//! [`Triplet::subject_phrase`] / [`Triplet::object_phrase`], and [`head_noun`] gives a name's
//! last word. Names are lowercase with single spaces; the spans locate them in the original
//! prompt, so the subject's tokens come from the subject's occurrence even in "a dog above a
//! dog" ([`triplet_token_indices`]).
//!
//! Several relations in one prompt each give a triplet, in prompt order: "a cat above a dog and
//! a dog to the left of a car", also with commas. A subject is the nearest noun phrase before
//! the relation, across a comma ("a cat above a dog, below a car": the dog is below the car, as
//! in the reference). A relation right after "and" with no subject of its own shares the
//! previous relation's subject ("a cat to the left of a dog and above a car": the cat is above
//! the car); one with no object before "and" shares the next one's ("a cat above and to the left
//! of a dog": two triplets).
//!
//! [`LeftOf`]: Relation::LeftOf
//! [`RightOf`]: Relation::RightOf
//! [`Above`]: Relation::Above
//! [`Below`]: Relation::Below

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use crate::tokenizer::{Encoding, Tokenizer};
use crate::{Error, Result};

/// A spatial relation the classifier knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Relation {
    Above,
    Below,
    LeftOf,
    RightOf,
}

impl Relation {
    /// All four, in the reference's class order.
    pub const ALL: [Relation; 4] = [
        Relation::Above,
        Relation::Below,
        Relation::LeftOf,
        Relation::RightOf,
    ];

    /// The classifier's class name: "above", "below", "to the left of", "to the right of".
    pub fn name(self) -> &'static str {
        match self {
            Relation::Above => "above",
            Relation::Below => "below",
            Relation::LeftOf => "to the left of",
            Relation::RightOf => "to the right of",
        }
    }

    /// The relation a class name or any phrasing of the module's table names ("to the left of",
    /// "left of", "on top of", "under", ...), ignoring case and spacing; `None` for anything else
    /// (such as the attribute class "is" that some checkpoints carry).
    pub fn from_name(name: &str) -> Option<Relation> {
        let words: Vec<String> = lex(name)
            .into_iter()
            .map(|t| t.text)
            .filter(|w| !w.is_empty())
            .collect();
        PHRASINGS
            .iter()
            .find(|(p, _)| p.split(' ').eq(words.iter().map(String::as_str)))
            .map(|&(_, r)| r)
    }

    /// The relation with subject and object swapped: above <-> below, left <-> right.
    pub fn inverse(self) -> Relation {
        match self {
            Relation::Above => Relation::Below,
            Relation::Below => Relation::Above,
            Relation::LeftOf => Relation::RightOf,
            Relation::RightOf => Relation::LeftOf,
        }
    }
}

impl fmt::Display for Relation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Relation {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Relation::from_name(s).ok_or_else(|| {
            Error::Invalid(format!(
                "unknown relation {s:?}: expected one of \"above\", \"below\", \"to the left of\", \"to the right of\" (or a phrasing such as \"left of\", \"on top of\", \"under\")"
            ))
        })
    }
}

/// "subject relation object", as found in a prompt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Triplet {
    /// The subject's name: its noun phrase without determiners and leading attribute adjectives,
    /// lowercase, single-spaced ("teddy bear", "circle" in "a red circle"). Its maps are the
    /// classifier's word 1.
    pub subject: String,
    pub relation: Relation,
    /// The object's name, as `subject`. Its maps are the classifier's word 2.
    pub object: String,
    /// Byte range of the subject's name in the prompt (first word's start to last word's end).
    pub subject_span: Range<usize>,
    /// Byte range of the object's name in the prompt.
    pub object_span: Range<usize>,
    /// The subject's whole noun phrase without determiners, adjectives kept ("red circle").
    pub subject_phrase: String,
    /// The object's whole noun phrase without determiners.
    pub object_phrase: String,
}

impl Triplet {
    /// The subject name's last word ("bear" in "teddy bear").
    pub fn subject_head(&self) -> &str {
        head_noun(&self.subject)
    }
    /// The object name's last word.
    pub fn object_head(&self) -> &str {
        head_noun(&self.object)
    }
}

impl fmt::Display for Triplet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "({}, {}, {})", self.subject, self.relation, self.object)
    }
}

/// The last word of a phrase: the head noun of an English noun phrase ("bear" in "teddy bear").
pub fn head_noun(phrase: &str) -> &str {
    phrase.split_whitespace().next_back().unwrap_or("")
}

/// Every relation triplet in `prompt`, in prompt order; empty when it states none (the prompt
/// then generates unsteered). See the module documentation for the phrasings and the rules.
///
/// ```
/// use steer::steering::prompt::{parse_relations, Relation};
/// let prompt = "a photo of a red dog to the left of a teddy bear";
/// let t = &parse_relations(prompt)[0];
/// assert_eq!((t.subject.as_str(), t.relation, t.object.as_str()), ("dog", Relation::LeftOf, "teddy bear"));
/// assert_eq!((&prompt[t.subject_span.clone()], t.subject_phrase.as_str()), ("dog", "red dog"));
/// assert!(parse_relations("a photo of a dog").is_empty());
/// ```
pub fn parse_relations(prompt: &str) -> Vec<Triplet> {
    let toks = lex(prompt);
    let start = intro_end(&toks);

    // Relation phrases, longest first at each position, not overlapping.
    let mut matches: Vec<(Range<usize>, Relation)> = Vec::new();
    let mut in_relation = vec![false; toks.len()];
    let mut i = start;
    while i < toks.len() {
        match match_relation(&toks, i) {
            Some((len, rel)) => {
                in_relation[i..i + len].iter_mut().for_each(|b| *b = true);
                matches.push((i..i + len, rel));
                i += len;
            }
            None => i += 1,
        }
    }
    let content = |k: usize| is_content(&toks[k]) && !in_relation[k];

    struct Raw {
        subject: Option<Range<usize>>,
        object: Option<Range<usize>>,
        share_subject: bool,
        share_object: bool,
    }
    let mut raw: Vec<Raw> = matches
        .iter()
        .map(|(m, _)| {
            // Subject: skip linking verbs and commas, then the run of content words before them
            // (so "a cat above a dog, below a car" puts the dog below the car, the nearest noun,
            // as the reference does).
            let mut j = m.start;
            while j > start {
                let t = &toks[j - 1];
                let trailing_participle = j - 1 > start
                    && is_participle(t)
                    && content(j - 1)
                    && content(j - 2)
                    && !is_attribute(&toks[j - 2].text);
                if ((is_filler(t) || t.text == ",") && !in_relation[j - 1]) || trailing_participle {
                    j -= 1;
                } else {
                    break;
                }
            }
            let mut k = j;
            while k > start && content(k - 1) {
                k -= 1;
            }
            let subject = (k < j).then_some(k..j);
            let share_subject = subject.is_none() && j > start && is_joiner(&toks[j - 1]);
            // Object: skip determiners, then the run of content words (up to an "-ing" word
            // that follows a noun: "a dog sleeping").
            let mut j = m.end;
            while j < toks.len() && is_determiner(&toks[j]) && !in_relation[j] {
                j += 1;
            }
            let mut k = j;
            while k < toks.len() && content(k) {
                if k > j && is_participle(&toks[k]) && !is_attribute(&toks[k - 1].text) {
                    break;
                }
                k += 1;
            }
            let object = (k > j).then_some(j..k);
            // "A above and to the left of B": an empty object followed by joiners, then a
            // relation, shares that relation's object.
            let mut after = m.end;
            while after < toks.len()
                && (is_joiner(&toks[after]) || toks[after].text == ",")
                && !in_relation[after]
            {
                after += 1;
            }
            let share_object =
                object.is_none() && after > m.end && after < toks.len() && in_relation[after];
            Raw {
                subject,
                object,
                share_subject,
                share_object,
            }
        })
        .collect();

    for n in 1..raw.len() {
        if raw[n].subject.is_none() && raw[n].share_subject {
            raw[n].subject = raw[n - 1].subject.clone();
        }
    }
    for n in (0..raw.len().saturating_sub(1)).rev() {
        if raw[n].object.is_none() && raw[n].share_object {
            raw[n].object = raw[n + 1].object.clone();
        }
    }

    raw.iter()
        .zip(&matches)
        .filter_map(|(r, (_, relation))| {
            let (subject_phrase, subject, subject_span) = phrase(&toks, r.subject.clone()?);
            let (object_phrase, object, object_span) = phrase(&toks, r.object.clone()?);
            Some(Triplet {
                subject,
                relation: *relation,
                object,
                subject_span,
                object_span,
                subject_phrase,
                object_phrase,
            })
        })
        .collect()
}

/// The positions in the text encoder's 77-token sequence (start token at 0) of the subject's
/// and the object's names: every token of every word of the name, taken at the name's own
/// occurrence (the triplet's spans), so "a dog above a dog" gives two different positions.
/// `prompt` must be the string the triplet was parsed from. An error names the word when it was
/// cut off by the length limit.
pub fn triplet_token_indices(
    tokenizer: &Tokenizer,
    prompt: &str,
    triplet: &Triplet,
) -> Result<(Vec<usize>, Vec<usize>)> {
    let encoding = tokenizer.encode(prompt)?;
    let subject = span_token_indices(&encoding, prompt, triplet.subject_span.clone())?;
    let object = span_token_indices(&encoding, prompt, triplet.object_span.clone())?;
    Ok((subject, object))
}

/// The positions (start token at 0) of the tokens of every word of `encoding` that overlaps
/// the byte range `span` of `prompt` (the string `encoding` was made from). An error when the
/// span is not in the prompt or not all of it fits the encoding.
pub fn span_token_indices(
    encoding: &Encoding,
    prompt: &str,
    span: Range<usize>,
) -> Result<Vec<usize>> {
    let Some(text) = prompt.get(span.clone()).filter(|t| !t.trim().is_empty()) else {
        return Err(Error::Invalid(format!(
            "byte range {span:?} is not a word of the prompt {prompt:?}"
        )));
    };
    let words: Vec<_> = encoding
        .words
        .iter()
        .filter(|w| w.span.start < span.end && span.start < w.span.end)
        .collect();
    // A word cut off by the length limit is missing from `encoding.words`, and so is the end
    // of a name when only its first words fit.
    let covered = words.last().is_some_and(|w| w.span.end >= span.end)
        && words.first().is_some_and(|w| w.span.start <= span.start);
    if !covered {
        return Err(Error::Invalid(format!(
            "{text:?} comes after the text encoder's {}-token limit in the prompt {prompt:?}",
            encoding.ids.len()
        )));
    }
    Ok(words.iter().flat_map(|w| w.tokens.clone()).collect())
}

// ---------------------------------------------------------------------------------------------
// Lexicon.

/// Every accepted phrasing, lowercase, words separated by one space.
const PHRASINGS: &[(&str, Relation)] = &[
    ("to the left of", Relation::LeftOf),
    ("on the left of", Relation::LeftOf),
    ("at the left of", Relation::LeftOf),
    ("left of", Relation::LeftOf),
    ("to left of", Relation::LeftOf),
    ("on left of", Relation::LeftOf),
    ("to the left side of", Relation::LeftOf),
    ("on the left side of", Relation::LeftOf),
    ("at the left side of", Relation::LeftOf),
    ("left side of", Relation::LeftOf),
    ("to the left-hand side of", Relation::LeftOf),
    ("on the left-hand side of", Relation::LeftOf),
    ("at the left-hand side of", Relation::LeftOf),
    ("to the left hand side of", Relation::LeftOf),
    ("on the left hand side of", Relation::LeftOf),
    ("to the right of", Relation::RightOf),
    ("on the right of", Relation::RightOf),
    ("at the right of", Relation::RightOf),
    ("right of", Relation::RightOf),
    ("to right of", Relation::RightOf),
    ("on right of", Relation::RightOf),
    ("to the right side of", Relation::RightOf),
    ("on the right side of", Relation::RightOf),
    ("at the right side of", Relation::RightOf),
    ("right side of", Relation::RightOf),
    ("to the right-hand side of", Relation::RightOf),
    ("on the right-hand side of", Relation::RightOf),
    ("at the right-hand side of", Relation::RightOf),
    ("to the right hand side of", Relation::RightOf),
    ("on the right hand side of", Relation::RightOf),
    ("above", Relation::Above),
    ("over", Relation::Above),
    ("atop", Relation::Above),
    ("on top of", Relation::Above),
    ("on the top of", Relation::Above),
    ("at the top of", Relation::Above),
    ("below", Relation::Below),
    ("under", Relation::Below),
    ("beneath", Relation::Below),
    ("underneath", Relation::Below),
    ("on the bottom of", Relation::Below),
    ("on bottom of", Relation::Below),
    ("at the bottom of", Relation::Below),
];

/// Words that open a noun phrase and are not part of it.
const DETERMINERS: &[&str] = &[
    "a", "an", "the", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    "ten", "some", "several", "many", "few", "another", "this", "that", "these", "those", "my",
    "your", "his", "her", "its", "our", "their", "each", "every", "all", "both", "no", "any",
];

/// Conjunctions: they separate phrases, and a relation right after one may share the previous
/// relation's subject.
const JOINERS: &[&str] = &[
    "and", "but", "while", "whereas", "&", "plus", "then", "also",
];

/// Other words that end a noun phrase: prepositions, pronouns, relative words.
const STOPS: &[&str] = &[
    "of", "in", "on", "at", "by", "for", "from", "to", "into", "onto", "near", "behind", "beside",
    "besides", "between", "inside", "outside", "next", "against", "across", "along", "around",
    "through", "within", "without", "toward", "towards", "upon", "with", "or", "nor", "as", "like",
    "than", "front", "it", "they", "them", "he", "she", "i", "we", "you", "there", "here", "where",
    "who", "which", "whose", "while",
];

/// Words between a subject and its relation that belong to neither ("a cat is sitting above").
const FILLERS: &[&str] = &[
    "is",
    "are",
    "was",
    "were",
    "be",
    "being",
    "been",
    "am",
    "sits",
    "sit",
    "sitting",
    "seated",
    "stands",
    "stand",
    "standing",
    "lies",
    "lie",
    "lying",
    "placed",
    "located",
    "positioned",
    "situated",
    "hangs",
    "hanging",
    "hung",
    "floats",
    "floating",
    "flying",
    "flies",
    "parked",
    "perched",
    "appears",
    "appearing",
    "shown",
    "seen",
    "that",
    "which",
    "who",
    "directly",
    "right",
    "just",
    "slightly",
    "immediately",
    "far",
    "somewhere",
    "partly",
    "also",
];

/// Picture nouns of an intro such as "a photo of" / "an image of".
const INTRO_NOUNS: &[&str] = &[
    "photo",
    "photograph",
    "picture",
    "pic",
    "image",
    "drawing",
    "painting",
    "illustration",
    "render",
    "rendering",
    "sketch",
    "scene",
    "view",
    "animation",
    "shot",
    "snapshot",
    "portrait",
    "cartoon",
    "artwork",
    "depiction",
];

/// Attribute adjectives removed from the front of an object name (never its last word): colours,
/// sizes, materials, common descriptors. Nouns used as modifiers ("glass", "stone", "metal",
/// "fire", "teddy") are deliberately absent: they are part of compound names.
const ATTRIBUTES: &[&str] = &[
    // colours
    "red",
    "orange",
    "yellow",
    "green",
    "blue",
    "purple",
    "violet",
    "pink",
    "brown",
    "black",
    "white",
    "gray",
    "grey",
    "golden",
    "silver",
    "beige",
    "cyan",
    "magenta",
    "turquoise",
    "teal",
    "maroon",
    "navy",
    "crimson",
    "colorful",
    "colourful",
    "multicolored",
    "multicoloured",
    "dark",
    "light",
    "bright",
    "pale",
    "transparent",
    // sizes and shapes
    "big",
    "small",
    "large",
    "little",
    "tiny",
    "huge",
    "giant",
    "gigantic",
    "enormous",
    "tall",
    "short",
    "long",
    "wide",
    "narrow",
    "thick",
    "thin",
    "fat",
    "medium",
    "massive",
    "mini",
    "round",
    "square",
    "rectangular",
    "circular",
    "triangular",
    "oval",
    // materials
    "wooden",
    "metallic",
    "plastic",
    "furry",
    "fluffy",
    "hairy",
    "leather",
    "woolen",
    "woollen",
    // descriptors
    "old",
    "new",
    "young",
    "cute",
    "shiny",
    "striped",
    "spotted",
    "empty",
    "full",
    "open",
    "closed",
    "wet",
    "dry",
    "clean",
    "dirty",
    "broken",
    "happy",
    "sad",
    "angry",
    "beautiful",
    "pretty",
    "ugly",
    "fancy",
    "vintage",
    "modern",
    "antique",
    "plain",
    "soft",
    "hard",
    "heavy",
    "rusty",
    "fresh",
    "ripe",
    "cold",
    "warm",
    "realistic",
    "cozy",
    "cosy",
    "elegant",
];

// ---------------------------------------------------------------------------------------------
// Lexing and matching.

/// Brackets and quotes: read as spaces ("(a dog) above (a cat)").
const TRANSPARENT: &str = "()[]{}\"\u{201c}\u{201d}\u{2018}\u{2019}'`*_";

/// A word (letters and digits, with inner hyphens and apostrophes: "sci-fi", "dog's") or one
/// other punctuation character, lowercased, with its byte range in the prompt.
#[derive(Debug)]
struct Tok {
    text: String,
    span: Range<usize>,
    word: bool,
}

fn lex(s: &str) -> Vec<Tok> {
    let chars: Vec<(usize, char)> = s.char_indices().collect();
    let end_of = |i: usize| chars.get(i).map_or(s.len(), |&(b, _)| b);
    let mut toks = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let (b, c) = chars[i];
        if c.is_whitespace() || TRANSPARENT.contains(c) {
            i += 1;
        } else if c.is_alphanumeric() {
            let mut j = i + 1;
            while j < chars.len() {
                let c = chars[j].1;
                let joins = matches!(c, '-' | '\'' | '\u{2019}')
                    && chars.get(j + 1).is_some_and(|&(_, n)| n.is_alphanumeric());
                if c.is_alphanumeric() || joins {
                    j += 1;
                } else {
                    break;
                }
            }
            let e = end_of(j);
            toks.push(Tok {
                text: s[b..e].to_lowercase(),
                span: b..e,
                word: true,
            });
            i = j;
        } else {
            let e = end_of(i + 1);
            toks.push(Tok {
                text: s[b..e].to_string(),
                span: b..e,
                word: c == '&',
            });
            i += 1;
        }
    }
    toks
}

/// The longest phrasing that starts at word `i`: (its length in words, its relation).
fn match_relation(toks: &[Tok], i: usize) -> Option<(usize, Relation)> {
    PHRASINGS
        .iter()
        .filter_map(|&(p, r)| {
            let n = p.split(' ').count();
            let words = toks.get(i..i + n)?;
            (words.iter().all(|t| t.word) && p.split(' ').eq(words.iter().map(|t| t.text.as_str())))
                .then_some((n, r))
        })
        .max_by_key(|&(n, _)| n)
}

/// The index of the first word after an intro ("a photo of", "an hyper-realistic digital
/// painting of"): an optional article, at most four words ending in a picture noun, then "of".
fn intro_end(toks: &[Tok]) -> usize {
    let first = usize::from(
        toks.first()
            .is_some_and(|t| is_one_of(t, &["a", "an", "the"])),
    );
    for of in first + 1..(first + 5).min(toks.len()) {
        if !toks[of - 1].word {
            return 0;
        }
        if toks[of].text == "of" {
            return if is_one_of(&toks[of - 1], INTRO_NOUNS) {
                of + 1
            } else {
                0
            };
        }
    }
    0
}

/// The phrase over word range `r`: (whole phrase, name, name's byte span).
fn phrase(toks: &[Tok], r: Range<usize>) -> (String, String, Range<usize>) {
    let words = &toks[r];
    let mut first = 0;
    while first + 1 < words.len() && is_attribute(&words[first].text) {
        first += 1;
    }
    let join = |ws: &[Tok]| {
        ws.iter()
            .map(|t| t.text.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    };
    let name = &words[first..];
    (
        join(words),
        join(name),
        name[0].span.start..name[name.len() - 1].span.end,
    )
}

fn is_one_of(t: &Tok, list: &[&str]) -> bool {
    t.word && list.contains(&t.text.as_str())
}

fn is_determiner(t: &Tok) -> bool {
    is_one_of(t, DETERMINERS) || (t.word && t.text.chars().all(|c| c.is_ascii_digit()))
}

fn is_joiner(t: &Tok) -> bool {
    is_one_of(t, JOINERS)
}

fn is_filler(t: &Tok) -> bool {
    is_one_of(t, FILLERS)
}

fn is_attribute(word: &str) -> bool {
    ATTRIBUTES.contains(&word)
}

/// A word that may be part of a noun phrase.
fn is_content(t: &Tok) -> bool {
    t.word && !is_determiner(t) && !is_joiner(t) && !is_one_of(t, STOPS) && !is_filler(t)
}

/// An "-ing" word ("sleeping", "jumping"; also "building", hence only after another noun).
fn is_participle(t: &Tok) -> bool {
    t.word && t.text.len() >= 6 && t.text.ends_with("ing")
}
