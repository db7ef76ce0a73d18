//! The data reader and the tokenizer path on samples built here (no download).

use sage_finetune::data::{parse_ground_truth, read_ground_truth, split, subset, Example};
use sage_finetune::text::TextEncoder;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::Tokenizer;

/// The file's shape: CRLF lines, id, a mean rating, text that may hold tabs and quotes.
const SAMPLE: &str =
    "1\t2.26666666667\tThe Rock is destined to be the 21st Century's new ''Conan''.\r\n\
2\t-0.6\tEffective but too tepid biopic\r\n\
3\t0\tA film.\r\n\
10\t1.5\tFun,\tfun fun!\r\n\
20\t-3.1\tdull\r\n";

#[test]
fn reads_labels_drops_zeros_and_splits_by_id() {
    let ex = parse_ground_truth(SAMPLE).unwrap();
    let ids: Vec<u32> = ex.iter().map(|e| e.id).collect();
    assert_eq!(ids, [1, 2, 10, 20]);
    assert_eq!(ex.iter().map(|e| e.label).collect::<Vec<_>>(), [1, 0, 1, 0]);
    assert_eq!(
        ex[0].text,
        "The Rock is destined to be the 21st Century's new ''Conan''."
    );
    assert_eq!(ex[2].text, "Fun,\tfun fun!", "a tab inside the text stays");
    let (train, dev) = split(ex.clone());
    assert_eq!(train.iter().map(|e| e.id).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(dev.iter().map(|e| e.id).collect::<Vec<_>>(), [10, 20]);
    // The subset is fixed by its seed and holds distinct examples.
    let a = subset(&ex, 3, 0);
    assert_eq!(a, subset(&ex, 3, 0));
    assert_eq!(a.len(), 3);
    assert!(a.iter().all(|e| ex.contains(e)));
    assert!(a[0] != a[1] && a[1] != a[2] && a[0] != a[2]);

    let path = std::env::temp_dir().join(format!("sage-rt-{}.txt", std::process::id()));
    std::fs::write(&path, SAMPLE.as_bytes()).unwrap();
    assert_eq!(read_ground_truth(&path).unwrap(), ex);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn malformed_lines_name_their_line() {
    let e = parse_ground_truth("1\t0.5\tok\nno tabs here\n").unwrap_err();
    assert!(e.contains("line 2"), "{e}");
    let e = parse_ground_truth("x\t0.5\tok\n").unwrap_err();
    assert!(e.contains("line 1") && e.contains("id"), "{e}");
    let e = parse_ground_truth("1\tgood\tok\n").unwrap_err();
    assert!(e.contains("rating"), "{e}");
    assert_eq!(parse_ground_truth("").unwrap(), Vec::<Example>::new());
}

/// A BERT WordPiece tokenizer with a tiny vocabulary, saved as `tokenizer.json` and read back
/// through the demo's own loader.
#[test]
fn tokenizer_json_encodes_truncates_and_pads() {
    let words = [
        "[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "film", "is", "fun", "dull", "!", ",", "##s",
    ];
    let vocab: [(String, u32); 12] = std::array::from_fn(|i| (words[i].to_string(), i as u32));
    let wp = WordPiece::builder()
        .vocab(vocab)
        .unk_token("[UNK]".into())
        .build()
        .unwrap();
    let mut tok = Tokenizer::new(wp);
    tok.with_normalizer(Some(BertNormalizer::default()));
    tok.with_pre_tokenizer(Some(BertPreTokenizer));
    tok.with_post_processor(Some(BertProcessing::new(
        ("[SEP]".into(), 3),
        ("[CLS]".into(), 2),
    )));
    let path = std::env::temp_dir().join(format!("sage-tok-{}.json", std::process::id()));
    tok.save(&path, false).unwrap();

    let enc = TextEncoder::from_file(&path, 6).unwrap();
    std::fs::remove_file(&path).unwrap();
    // Lower-cased, punctuation split, unknown words to [UNK], [CLS] … [SEP] around.
    // "the film is fun !" is 5 tokens + 2 special = 7 > 6: truncated, [SEP] kept.
    assert_eq!(enc.encode("The FILM is fun!").unwrap(), [2, 4, 5, 6, 7, 3]);
    assert_eq!(enc.encode("films, zebra").unwrap(), [2, 5, 11, 10, 1, 3]);
    let short = enc.encode("dull").unwrap();
    assert_eq!(short, [2, 8, 3]);
    let long = enc.encode("the film is fun , the film is dull").unwrap();
    assert_eq!(long.len(), 6, "truncated to max_len");
    assert_eq!(long, [2, 4, 5, 6, 7, 3], "keeps its closing [SEP]");

    let b = enc.pad(&[&short, &long]);
    assert_eq!((b.rows, b.len), (2, 6));
    assert_eq!(&b.ids[..6], &[2, 8, 3, 0, 0, 0]);
    assert_eq!(&b.mask[..6], &[1.0, 1.0, 1.0, 0.0, 0.0, 0.0]);
    assert_eq!(&b.mask[6..], &[1.0; 6]);
}
