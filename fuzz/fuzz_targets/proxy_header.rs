//! The PROXY protocol header parser and the `--proxy-protocol-from` networks.
//!
//! `proxy::parse` must not panic, and reading the way `conn` does (never more than `NeedMore`
//! asks for) must never pass the header's end: every proper prefix of a header is `NeedMore`
//! with a count that stays within it, and a header's verdict doesn't depend on what follows it.
//! Fed step by step or parsed whole, the input gets the same verdict. A network that parses
//! prints as something that parses back to itself, and contains its own address.
#![no_main]

use aiopopd::proxy::{self, Cidr, Progress};
use libfuzzer_sys::fuzz_target;

/// As `conn` reads: start empty, read what is asked for (or what there is), parse again.
fn fed(data: &[u8]) -> (usize, Result<Progress, proxy::Error>) {
    let mut have = 0;
    loop {
        let r = proxy::parse(&data[..have]);
        match r {
            Ok(Progress::NeedMore(n)) if have < data.len() => {
                assert!(n >= 1, "NeedMore(0)");
                have = (have + n).min(data.len());
            }
            r => return (have, r),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let whole = proxy::parse(data);
    let (have, stepwise) = fed(data);
    match &stepwise {
        Ok(Progress::Done { consumed, source }) => {
            assert_eq!(*consumed, have, "read past the header's end");
            assert!(*consumed >= 15 && *consumed <= 16 + 65535);
            // What follows the header changes nothing.
            assert_eq!(whole, stepwise);
            let header = &data[..*consumed];
            for cut in 0..*consumed {
                match proxy::parse(&header[..cut]) {
                    Ok(Progress::NeedMore(n)) => {
                        assert!(cut + n <= *consumed, "NeedMore({n}) at {cut} overruns")
                    }
                    other => panic!("prefix of {cut} octets: {other:?}"),
                }
            }
            if source.is_some() && header[0] == b'P' {
                assert!(header.starts_with(b"PROXY TCP"));
            }
        }
        Err(_) => assert!(whole.is_err(), "stepwise refused, whole: {whole:?}"),
        Ok(Progress::NeedMore(_)) => {
            assert_eq!(have, data.len());
            assert_eq!(whole, stepwise);
        }
    }

    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(list) = proxy::parse_list(text) {
            for net in list {
                let again: Cidr = net.to_string().parse().expect("a network prints as one");
                assert_eq!(again, net);
                let ip = net.to_string().split('/').next().unwrap().parse().unwrap();
                assert!(net.contains(ip), "{net} doesn't contain its own address");
            }
        }
    }
});
