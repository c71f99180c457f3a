//! Manifest files: any bytes, as a `.yaml` or a `.json` file, read as the agent reads a
//! small file (whole) and a big one (in parts, each parsed on its own; JSON List items
//! parsed in place by simd-json), and the streamed and buffered readings of JSON.
//!
//! Besides not panicking: the parts never change a result or an error, nor does the
//! streamed reading of JSON (the buffered reading defines them), every error names the
//! file, and every model is the object its document names.

#![no_main]

use std::path::Path;

use lb_userspace::{
    fuzzing::readings,
    model::{Kind, ObjectModel},
};
use lb_userspace_fuzz::{summary, summary_of};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    // Small parts, so that small inputs are cut too: at any byte, in any number of parts;
    // and either extension (it matters where a text is not what its name says).
    let part_size = 1 + bytes.len() / 2 % 61;
    let file = ["m.yaml", "m.json"][bytes.len() % 2];
    let read = readings(Path::new(file), bytes, part_size);
    let whole = summary_of(&read.whole);
    assert_eq!(
        summary_of(&read.in_parts),
        whole,
        "{file}: read in parts of {part_size} bytes and whole"
    );
    // Not yet for YAML: streamed, serde_yaml types a scalar as the field wants it (`name:
    // 123` is the name "123"); buffered, the text is JSON values first (123 is a number,
    // which is no name). See README.md, "Fuzzing".
    if let Some((streamed, buffered)) = &read.streamed_json {
        assert_eq!(
            Ok(summary(streamed)),
            summary_of(buffered),
            "{file}: streamed and buffered"
        );
    }
    let names_the_file = |error: String| {
        assert!(error.starts_with(&format!("{file}: ")), "{error}");
    };
    match &read.whole {
        Err(error) => names_the_file(error.to_string()),
        Ok(documents) => {
            for document in documents {
                match (&document.object, document.kind) {
                    (Err(error), _) => names_the_file(error.to_string()),
                    (Ok(ObjectModel::Service(service)), Kind::Service) => {
                        assert_eq!(service.id, document.id);
                    }
                    (Ok(ObjectModel::Slice(slice)), Kind::EndpointSlice) => {
                        assert_eq!(slice.id, document.id);
                    }
                    (Ok(_), kind) => panic!("a {kind} document of another kind's model"),
                }
            }
        }
    }
});
