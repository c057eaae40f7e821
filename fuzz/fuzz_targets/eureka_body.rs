//! Eureka registration bodies (resolver/src/api/eureka/codec.rs): `parse_registration` on
//! any bytes, JSON or XML. A registration it accepts is answered back to Eureka clients, in
//! XML and in JSON: each answer must itself read back as the same instance (ID, address,
//! port, metadata keys), so no accepted input makes an answer a client cannot read.
//!
//! Input: the path's application name, a newline, then the body.

#![no_main]

use libfuzzer_sys::fuzz_target;
use waymark_resolver::api::eureka::codec::{self, Action, Format, InstanceView, Status};

fuzz_target!(|data: &[u8]| {
    let Some(newline) = data.iter().position(|b| *b == b'\n') else {
        return;
    };
    let (Ok(app), body) = (std::str::from_utf8(&data[..newline]), &data[newline + 1..]) else {
        return;
    };
    let Ok(reg) = codec::parse_registration(body, app, 1) else {
        return;
    };
    let _ = codec::service_name(&reg.info.app);
    let view = InstanceView {
        id: reg.instance_id.clone(),
        ip_addr: reg.ip_addr.clone(),
        metadata: reg.metadata.clone(),
        info: reg.info.clone(),
        status: Status::Up,
        overridden: Status::Unknown,
        create_index: 1,
        modify_index: 1,
    };
    for format in [Format::Xml, Format::Json] {
        let body = codec::encode_instance(&view, Action::Added, format);
        let back = codec::parse_registration(body.as_bytes(), app, 1)
            .unwrap_or_else(|e| panic!("the {format:?} answer does not read back: {e}\n{body}"));
        assert_eq!(back.instance_id, reg.instance_id, "{body}");
        assert_eq!(back.ip_addr, reg.ip_addr, "{body}");
        assert_eq!(back.port(), reg.port(), "{body}");
        assert!(back.metadata.keys().eq(reg.metadata.keys()), "{body}");
    }
});
