//! The bundled CLIP tokenizer against transformers' CLIPTokenizer built from open_clip's BPE
//! vocabulary (tools/reference/make_tokenizer_fixture.py): identical ids for a few dozen awkward
//! texts, truncation to 77 keeping the end-of-text token.

mod common;

use vlalign::data::text::TextTokenizer;

#[derive(serde::Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
    truncated: bool,
}

#[test]
fn clip_ids_equal_transformers() {
    let cases: Vec<Case> = serde_json::from_str(
        &std::fs::read_to_string(common::fixture("clip_tokenizer_ids.json")).unwrap(),
    )
    .unwrap();
    assert!(cases.len() >= 30);
    let tok = TextTokenizer::bundled_clip(77).unwrap();
    for c in &cases {
        let enc = tok.encode(&[&c.text]).unwrap();
        assert_eq!(enc.batch.ids[0], c.ids, "ids of {:?}", c.text);
        assert_eq!(
            enc.truncated[0], c.truncated,
            "truncation flag of {:?}",
            c.text
        );
        if c.truncated {
            assert_eq!(c.ids.len(), 77);
            assert_eq!(*c.ids.last().unwrap(), 49407, "EOS kept after truncation");
        }
    }
}

#[test]
fn batch_is_right_padded_with_end_of_text() {
    let tok = TextTokenizer::bundled_clip(77).unwrap();
    let enc = tok.encode(&["a photo of a cat", "a"]).unwrap();
    assert_eq!(enc.batch.ids[0], [49406, 320, 1125, 539, 320, 2368, 49407]);
    assert_eq!(
        enc.batch.ids[1],
        [49406, 320, 49407, 49407, 49407, 49407, 49407]
    );
    assert_eq!(enc.batch.mask[1], [1, 1, 1, 0, 0, 0, 0]);
}
