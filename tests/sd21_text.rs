//! SD2.1's tokenizer and text encoder against transformers, on the tiny pipelines that
//! tests/reference/sd21_fixtures.py writes (tests/fixtures/tiny-sd21 and tiny-sd21-v) and the
//! references it records in tests/fixtures/tiny-sd21-reference.safetensors (`text.*`, and
//! `maps.capture_tokens_*` for the word positions).
//!
//! The tokenizer cases that are not in the reference file (odd spacing, case, punctuation, the
//! "!" pad token inside a prompt, legacy config files) carry their expected ids inline: they are
//! what transformers 5.24's `CLIPTokenizer` gives on the same files, recorded when these tests
//! were written.
//!
//! Encoder tolerance: 1e-4 relative (max abs diff / max abs reference). Both sides are float32
//! with the same weights (the fixture's float16 values); a 2-layer, 32-wide encoder accumulates
//! only rounding differences: measured 4.2e-7 (last_hidden_state) and 3.0e-7 (pooler_output)
//! (run with `--nocapture` to see them).

use std::path::{Path, PathBuf};

use steer::models::clip_text::CLIPTextModel;
use steer::safetensors_io::SafetensorsFile;
use steer::tokenizer::Tokenizer;
use steer::Tensor;

const PROMPT: &str = "a photo of a dog to the left of a teddy bear";
const TOL: f64 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn reference(name: &str) -> Tensor {
    let path = fixtures().join("tiny-sd21-reference.safetensors");
    let file = SafetensorsFile::open(&path).unwrap_or_else(|e| panic!("{e}"));
    file.tensor(name).unwrap_or_else(|e| panic!("{e}"))
}

fn reference_ids(name: &str) -> Vec<u32> {
    reference(name)
        .to_vec::<i64>()
        .unwrap()
        .into_iter()
        .map(|i| i as u32)
        .collect()
}

/// A fresh scratch folder for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("sd21_text")
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A copy of the fixture's tokenizer folder without `tokenizer.json` (SD2.1's own layout:
/// vocab.json + merges.txt), with `configs` replacing its config files when given.
fn vocab_merges_dir(name: &str, configs: Option<(&str, &str)>) -> PathBuf {
    let src = fixtures().join("tiny-sd21/tokenizer");
    let dir = scratch(name);
    for f in ["vocab.json", "merges.txt"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    match configs {
        None => {
            for f in ["tokenizer_config.json", "special_tokens_map.json"] {
                std::fs::copy(src.join(f), dir.join(f)).unwrap();
            }
        }
        Some((config, map)) => {
            std::fs::write(dir.join("tokenizer_config.json"), config).unwrap();
            if !map.is_empty() {
                std::fs::write(dir.join("special_tokens_map.json"), map).unwrap();
            }
        }
    }
    dir
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_dir(fixtures().join("tiny-sd21/tokenizer")).unwrap_or_else(|e| panic!("{e}"))
}

/// The ids up to and including the end token.
fn unpadded(tok: &Tokenizer, prompt: &str) -> Vec<u32> {
    let enc = tok.encode(prompt).unwrap();
    assert_eq!(enc.ids.len(), 77);
    assert!(
        enc.ids[enc.len..].iter().all(|&i| i == tok.pad_id()),
        "padding after the end token"
    );
    enc.ids[..enc.len].to_vec()
}

#[test]
fn tokenizer_json_and_vocab_merges_match_transformers() {
    let from_json = tokenizer();
    let from_vocab = Tokenizer::from_dir(vocab_merges_dir("vocab_merges", None)).unwrap();
    for tok in [&from_json, &from_vocab] {
        assert_eq!(
            (tok.bos_id(), tok.eos_id(), tok.pad_id(), tok.max_length()),
            (573, 574, 0, 77)
        );
        assert_eq!(
            tok.encode(PROMPT).unwrap().ids,
            reference_ids("text.input_ids")
        );
        assert_eq!(
            tok.encode("").unwrap().ids,
            reference_ids("text.uncond_input_ids")
        );
        // Whitespace, case, punctuation, contractions, digits, bytes outside the tiny vocabulary,
        // and "!" matched as the pad token (id 0) inside the text, as transformers does.
        #[rustfmt::skip]
        let cases: [(&str, &[u32]); 3] = [
            ("A  Photo\tof a DOG!! to the left, of a teddy-bear's side",
             &[573, 320, 515, 516, 320, 518, 0, 0, 528, 530, 533, 267, 516, 320, 549, 268, 551, 6, 338, 561, 574]),
            ("dog!? hotdog  teddybear 123 café",
             &[573, 518, 0, 286, 71, 78, 83, 518, 548, 88, 551, 272, 273, 274, 519, 69, 127, 358, 574]),
            // The special tokens' `normalized: false`: only the exact lowercase text matches.
            ("A <|ENDOFTEXT|> <|endoftext|>x",
             &[573, 320, 27, 347, 68, 77, 517, 69, 546, 87, 339, 91, 285, 574, 343, 574]),
        ];
        for (prompt, want) in cases {
            assert_eq!(unpadded(tok, prompt), want, "{prompt:?}");
        }
    }
}

#[test]
fn legacy_and_clip_l_configs() {
    // SD2.1's layout: tokenizer_config.json says pad <|endoftext|> and has no
    // added_tokens_decoder, so special_tokens_map.json's "!" wins; its special tokens are objects
    // with `normalized: true`, so they also match after lowercasing.
    let token = |c: &str| {
        format!(
            r#"{{"content": "{c}", "lstrip": false, "normalized": true, "rstrip": false, "single_word": false}}"#
        )
    };
    let config = format!(
        r#"{{"bos_token": {}, "eos_token": {}, "unk_token": {}, "pad_token": "<|endoftext|>", "model_max_length": 77, "do_lower_case": true}}"#,
        token("<|startoftext|>"),
        token("<|endoftext|>"),
        token("<|endoftext|>")
    );
    let map = format!(
        r#"{{"bos_token": {}, "eos_token": {}, "unk_token": {}, "pad_token": "!"}}"#,
        token("<|startoftext|>"),
        token("<|endoftext|>"),
        token("<|endoftext|>")
    );
    let legacy = Tokenizer::from_dir(vocab_merges_dir("legacy", Some((&config, &map)))).unwrap();
    assert_eq!(legacy.pad_id(), 0);
    assert_eq!(
        unpadded(&legacy, "a dog!! <|endoftext|> <|startoftext|>x"),
        [573, 320, 518, 0, 0, 574, 573, 343, 574]
    );
    assert_eq!(unpadded(&legacy, "A <|ENDOFTEXT|>"), [573, 320, 574, 574]);

    // CLIP-L's (SD1.x): pads with the end token; "!" is an ordinary token ("!</w>", 256).
    let clip_l = r#"{"model_max_length": 77, "pad_token": "<|endoftext|>"}"#;
    let clip_l = Tokenizer::from_dir(vocab_merges_dir("clip_l", Some((clip_l, "")))).unwrap();
    assert_eq!(clip_l.pad_id(), 574);
    let enc = clip_l.encode("a dog!").unwrap();
    assert_eq!(enc.len, 5);
    assert_eq!(&enc.ids[..5], [573, 320, 518, 256, 574]);
    assert!(enc.ids[5..].iter().all(|&i| i == 574));
}

#[test]
fn word_token_indices_match_the_reference() {
    let tok = tokenizer();
    let want = |n: &str| {
        reference(&format!("maps.capture_tokens_{n}"))
            .to_vec::<i64>()
            .unwrap()
    };
    let as_i64 = |v: Vec<usize>| v.into_iter().map(|i| i as i64).collect::<Vec<_>>();
    assert_eq!(
        as_i64(tok.word_token_indices(PROMPT, "dog").unwrap()),
        want("0")
    );
    assert_eq!(
        as_i64(tok.word_token_indices(PROMPT, "teddy bear").unwrap()),
        want("1")
    );
    assert_eq!(tok.word_token_indices(PROMPT, "dog").unwrap(), [5]);
    assert_eq!(
        tok.word_token_indices(PROMPT, "teddy bear").unwrap(),
        [11, 12]
    );
    // First occurrence; case and spacing do not matter; a word of several tokens.
    assert_eq!(tok.word_token_indices(PROMPT, "a").unwrap(), [1]);
    assert_eq!(
        tok.word_token_indices(PROMPT, "Teddy   BEAR").unwrap(),
        [11, 12]
    );
    assert_eq!(
        tok.word_token_indices("a photo of a hotdog", "hotdog")
            .unwrap(),
        [5, 6, 7, 8]
    );

    let enc = tok.encode(PROMPT).unwrap();
    let words: Vec<&str> = enc.words.iter().map(|w| w.text.as_str()).collect();
    assert_eq!(words, PROMPT.split(' ').collect::<Vec<_>>());
    assert_eq!(enc.words[10].tokens, 11..12);
    assert_eq!(&PROMPT[enc.words[10].span.clone()], "teddy");
}

#[test]
fn a_word_not_in_the_prompt_is_an_error_naming_it() {
    let tok = tokenizer();
    for word in ["cat", "bear teddy", "hot", "bear!"] {
        let e = tok
            .word_token_indices(PROMPT, word)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("{word:?}")), "{e}");
    }
    // Whole words only: "dog" is not a word of "hotdog".
    assert!(tok
        .word_token_indices("a photo of a hotdog", "dog")
        .is_err());
    assert!(tok.word_token_indices(PROMPT, "  ").is_err());
}

#[test]
fn long_prompts_are_truncated() {
    let tok = tokenizer();
    let long = vec!["teddy bear"; 50].join(" ") + " dog";
    let enc = tok.encode(&long).unwrap();
    assert!(enc.truncated);
    assert_eq!((enc.ids.len(), enc.len), (77, 77));
    assert_eq!((enc.ids[0], enc.ids[76]), (573, 574));
    assert!(enc.ids[1..76]
        .chunks(2)
        .all(|p| p == [549, 551] || p == [549]));
    assert_eq!(enc.words.last().unwrap().tokens.end, 76);
    // A word only past the limit is an error; one before it is found.
    let e = tok
        .word_token_indices(&long, "dog")
        .unwrap_err()
        .to_string();
    assert!(e.contains("\"dog\"") && e.contains("limit"), "{e}");
    assert_eq!(tok.word_token_indices(&long, "bear").unwrap(), [2]);
    // The encoder takes the truncated encoding.
    let model = CLIPTextModel::from_dir(fixtures().join("tiny-sd21/text_encoder")).unwrap();
    assert_eq!(
        model.forward(&enc.ids).unwrap().last_hidden_state.shape(),
        [1, 77, 32]
    );
}

#[test]
fn missing_files_are_errors_naming_them() {
    let empty = scratch("missing_vocab");
    std::fs::copy(
        fixtures().join("tiny-sd21/tokenizer/merges.txt"),
        empty.join("merges.txt"),
    )
    .unwrap();
    let e = Tokenizer::from_dir(&empty)
        .err()
        .expect("no vocab.json")
        .to_string();
    assert!(e.contains("vocab.json"), "{e}");
    let e = Tokenizer::from_dir(scratch("nothing").join("tokenizer"))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("tokenizer"), "{e}");

    let te = scratch("missing_weights");
    std::fs::copy(
        fixtures().join("tiny-sd21/text_encoder/config.json"),
        te.join("config.json"),
    )
    .unwrap();
    let e = CLIPTextModel::from_dir(&te)
        .expect_err("no weights")
        .to_string();
    assert!(e.contains("model.safetensors"), "{e}");
    let e = CLIPTextModel::from_dir(scratch("missing_config"))
        .expect_err("no config")
        .to_string();
    assert!(e.contains("config.json"), "{e}");
}

#[test]
fn text_encoder_matches_transformers() {
    let ids = reference_ids("text.input_ids");
    let uncond = reference_ids("text.uncond_input_ids");
    // tiny-sd21 has transformers 5's key names, tiny-sd21-v SD2.1's `text_model.` prefix.
    for dir in ["tiny-sd21", "tiny-sd21-v"] {
        let model = CLIPTextModel::from_dir(fixtures().join(dir).join("text_encoder"))
            .unwrap_or_else(|e| panic!("{e}"));
        let out = model.forward(&ids).unwrap();
        let e_last = out
            .last_hidden_state
            .rel_error(&reference("text.last_hidden_state"))
            .unwrap();
        let e_pool = out
            .pooler_output
            .rel_error(&reference("text.pooler_output"))
            .unwrap();
        let e_uncond = model
            .forward(&uncond)
            .unwrap()
            .last_hidden_state
            .rel_error(&reference("text.uncond_hidden_state"))
            .unwrap();
        println!("{dir}: last_hidden_state {e_last:.2e}, pooler_output {e_pool:.2e}, uncond {e_uncond:.2e}");
        for (what, e) in [
            ("last_hidden_state", e_last),
            ("pooler_output", e_pool),
            ("uncond", e_uncond),
        ] {
            assert!(e <= TOL, "{dir} {what}: rel error {e:.3e} > {TOL:e}");
        }
        // The int64 tensor entry point (as `steer forward` reads `input_ids`), batched.
        let both = Tensor::from_vec(
            [ids.clone(), uncond.clone()]
                .concat()
                .iter()
                .map(|&i| i as i64)
                .collect(),
            &[2, 77],
        )
        .unwrap();
        let batched = model.forward_tensor(&both).unwrap();
        assert_eq!(batched.last_hidden_state.shape(), [2, 77, 32]);
        assert_eq!(batched.pooler_output.shape(), [2, 32]);
        let first = batched.pooler_output.to_vec::<f32>().unwrap()[..32].to_vec();
        assert_eq!(first, out.pooler_output.to_vec::<f32>().unwrap());
    }
}

#[test]
fn the_tokenizer_feeds_the_encoder() {
    let tok = tokenizer();
    let model = CLIPTextModel::from_dir(fixtures().join("tiny-sd21/text_encoder")).unwrap();
    let out = model.forward(&tok.encode(PROMPT).unwrap().ids).unwrap();
    assert!(
        out.last_hidden_state
            .rel_error(&reference("text.last_hidden_state"))
            .unwrap()
            <= TOL
    );
}
