//! The tokenizer a training config names (`tokenizer = "shapes" | "clip" | PATH`), and the
//! special token ids a CLIP text tower needs from it.

use super::config::TokenizerSpec;
use super::task::ExtraFiles;
use crate::data::shapes;
use crate::data::text::{word_level_tokenizer_config, TextTokenizer};
use crate::error::{Error, Result};

/// The tokenizer `spec` names, bound to `context` tokens, and the files to ship with it in a
/// model directory (the shapes word-level tokenizer needs its `tokenizer_config.json`).
pub fn tokenizer_for(spec: &TokenizerSpec, context: usize) -> Result<(TextTokenizer, ExtraFiles)> {
    Ok(match spec {
        TokenizerSpec::Shapes => {
            let tok = TextTokenizer::word_level(&shapes::vocabulary(), context)?;
            let cfg =
                serde_json::to_vec_pretty(&word_level_tokenizer_config(context)).expect("json");
            (tok, vec![("tokenizer_config.json".into(), cfg)])
        }
        TokenizerSpec::Clip => (TextTokenizer::bundled_clip(context)?, Vec::new()),
        TokenizerSpec::File(path) => (TextTokenizer::from_file(path, context)?, Vec::new()),
    })
}

/// `(bos, eos, pad)` of a CLIP text tower trained with `tok` (made from `spec`): the text is
/// pooled at its end-of-text token, so a tokenizer without one is an error.
pub fn clip_special_ids(spec: &TokenizerSpec, tok: &TextTokenizer) -> Result<(u32, u32, u32)> {
    match spec {
        // The word-level tokenizer numbers its specials: 0 pad, 1 unk, 2 start, 3 end of text.
        TokenizerSpec::Shapes => Ok((2, 3, 0)),
        TokenizerSpec::Clip => Ok((49406, 49407, 1)),
        TokenizerSpec::File(path) => {
            let id = |names: &[&str]| names.iter().find_map(|n| tok.token_to_id(n));
            let bos = id(&["<|startoftext|>", "[CLS]", "<s>", "<bos>"]).unwrap_or(0);
            let eos = id(&["<|endoftext|>", "[SEP]", "</s>", "<eos>"]).ok_or_else(|| {
                Error::config(
                    path,
                    "no end-of-text token (<|endoftext|>, [SEP], </s>) to pool the text at",
                )
            })?;
            Ok((bos, eos, tok.pad_id()))
        }
    }
}
