//! Characters as tokens: the tokenizer, the built-in corpus and text files.

use std::collections::BTreeSet;
use std::path::Path;

use kiln_core::Error;
use kiln_core::rng::SplitMix64;

/// Maps each distinct character of a text to a token id, in sorted character order
/// (so the same text always gives the same ids).
///
/// ```
/// use kiln_models::CharTokenizer;
/// let tok = CharTokenizer::from_text("hello");
/// assert_eq!(tok.vocab_size(), 4);
/// let ids = tok.encode("hole").unwrap();
/// assert_eq!(tok.decode(&ids), "hole");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CharTokenizer {
    chars: Vec<char>,
}

impl CharTokenizer {
    /// The tokenizer whose vocabulary is the distinct characters of `text`.
    pub fn from_text(text: &str) -> Self {
        let set: BTreeSet<char> = text.chars().collect();
        Self {
            chars: set.into_iter().collect(),
        }
    }

    /// Number of distinct characters.
    pub fn vocab_size(&self) -> usize {
        self.chars.len()
    }

    /// Token ids of `text`; a character outside the vocabulary is an error naming it.
    pub fn encode(&self, text: &str) -> kiln_core::Result<Vec<u32>> {
        text.chars()
            .map(|c| {
                self.chars.binary_search(&c).map(|i| i as u32).map_err(|_| {
                    Error::Data(format!(
                        "character {c:?} is not in the tokenizer's vocabulary"
                    ))
                })
            })
            .collect()
    }

    /// The text of `ids`; ids outside the vocabulary become U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        ids.iter()
            .map(|&i| self.chars.get(i as usize).copied().unwrap_or('\u{FFFD}'))
            .collect()
    }
}

/// Reads a UTF-8 text file for training.
///
/// A missing, unreadable, empty or non-UTF-8 file is an [`Error::DataFile`] that names
/// the file and what is wrong (for non-UTF-8, the byte offset of the first bad byte).
pub fn load_text_file(path: &Path) -> kiln_core::Result<String> {
    let fail = |reason: String| Error::DataFile {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => fail("no such file".into()),
        _ => fail(e.to_string()),
    })?;
    if bytes.is_empty() {
        return Err(fail("the file is empty".into()));
    }
    String::from_utf8(bytes).map_err(|e| {
        fail(format!(
            "not valid UTF-8 (first bad byte at offset {})",
            e.utf8_error().valid_up_to()
        ))
    })
}

/// The built-in training text: about 300,000 characters of play-like dialogue
/// generated from a fixed seed by a small grammar, written for kiln (no licence
/// question). It has structure to learn (speaker names, word shapes, punctuation,
/// line breaks) and a vocabulary of fewer than 65 characters.
pub fn builtin_corpus() -> String {
    const SPEAKERS: &[&str] = &[
        "MARGERY",
        "OSWIN",
        "THE HERALD",
        "LADY ISOLDE",
        "BROTHER TOBIAS",
        "CORDELIO",
        "NELL",
    ];
    const SUBJECTS: &[&str] = &[
        "the king",
        "my lord",
        "the night",
        "this house",
        "our cause",
        "the river",
        "your father",
        "the old smith",
        "every heart",
        "the crown",
        "a stranger",
        "the bell",
    ];
    const VERBS: &[&str] = &[
        "remembers",
        "betrays",
        "keeps",
        "forgets",
        "calls for",
        "waits upon",
        "carries",
        "fears",
        "loves",
        "would not leave",
        "has found",
        "speaks of",
    ];
    const OBJECTS: &[&str] = &[
        "the gate",
        "a quiet word",
        "the winter",
        "his brother",
        "the silver cup",
        "our names",
        "the long road",
        "her letter",
        "the morning",
        "a broken oath",
        "the hill",
        "the fire",
    ];
    const TAILS: &[&str] = &[
        "",
        " tonight",
        " at dawn",
        " before the rain",
        " in secret",
        " for all our sakes",
        " again",
        " without a sound",
    ];
    const ASIDES: &[&str] = &[
        "Alas",
        "Good sir",
        "Peace",
        "Hark",
        "Nay",
        "Come",
        "I pray you",
        "Why, then",
    ];
    let mut rng = SplitMix64::new(0x6B69_6C6E); // "kiln"
    let pick = |rng: &mut SplitMix64, xs: &[&'static str]| xs[rng.below(xs.len() as u64) as usize];
    let mut out = String::with_capacity(310_000);
    while out.len() < 300_000 {
        out.push_str(pick(&mut rng, SPEAKERS));
        out.push_str(":\n");
        let sentences = 1 + rng.below(3);
        for s in 0..sentences {
            if rng.below(3) == 0 {
                out.push_str(pick(&mut rng, ASIDES));
                out.push_str(", ");
                out.push_str(pick(&mut rng, SUBJECTS));
            } else {
                let subject = pick(&mut rng, SUBJECTS);
                let mut cs = subject.chars();
                if let Some(first) = cs.next() {
                    out.extend(first.to_uppercase());
                    out.push_str(cs.as_str());
                }
            }
            out.push(' ');
            out.push_str(pick(&mut rng, VERBS));
            out.push(' ');
            out.push_str(pick(&mut rng, OBJECTS));
            out.push_str(pick(&mut rng, TAILS));
            out.push_str(match rng.below(4) {
                0 => "?",
                1 => "!",
                _ => ".",
            });
            out.push(if s + 1 == sentences { '\n' } else { ' ' });
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    #[test]
    fn builtin_corpus_is_fixed_and_fits_the_tiny_vocabulary() {
        let a = builtin_corpus();
        assert_eq!(a, builtin_corpus());
        assert!(a.len() >= 300_000);
        let v = CharTokenizer::from_text(&a).vocab_size();
        assert!((20..=65).contains(&v), "vocabulary {v}");
    }

    #[test]
    fn encode_rejects_unknown_characters() {
        let tok = CharTokenizer::from_text("abc");
        let err = tok.encode("abz").unwrap_err().to_string();
        assert!(err.contains("'z'"), "{err}");
    }

    #[rstest]
    #[case::missing(None, "no such file")]
    #[case::empty(Some(&b""[..]), "the file is empty")]
    #[case::latin1(Some(&b"caf\xe9"[..]), "not valid UTF-8 (first bad byte at offset 3)")]
    fn bad_text_files_are_named_errors(#[case] content: Option<&[u8]>, #[case] needle: &str) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("input.txt");
        if let Some(bytes) = content {
            std::fs::write(&path, bytes).unwrap();
        }
        let err = load_text_file(&path).unwrap_err().to_string();
        assert!(err.contains(needle) && err.contains("input.txt"), "{err}");
    }
}
