//! Prints the violations the validator finds in each file named on the
//! command line: `cargo run --example validate -- doc.xml ...`.

use std::process::ExitCode;

fn main() -> ExitCode {
    let mut status = ExitCode::SUCCESS;
    for path in std::env::args().skip(1) {
        match std::fs::read(&path) {
            Err(e) => {
                eprintln!("{path}: {e}");
                status = ExitCode::FAILURE;
            }
            Ok(bytes) => match iodef_validator::validate(&bytes) {
                Ok(()) => println!("{path}: valid"),
                Err(violations) => {
                    status = ExitCode::FAILURE;
                    for v in violations {
                        println!("{path}: {} : {}", v.location, v.message);
                    }
                }
            },
        }
    }
    status
}
