//! The API objects the agent watches, as it reads them: deserialization keeps only the fields
//! kwire uses and skips the rest while parsing (managedFields, status conditions and container
//! statuses, other annotations, container images, env, volumes...), so none of it is ever
//! allocated, let alone stored.
//!
//! Each view implements [`kube::Resource`] with the kind, group, version and plural of the
//! k8s-openapi type it stands for, so `Api<PodView>` lists and watches `/api/v1/pods` and the
//! watcher resumes from the views' resourceVersions like from full objects. A view is turned
//! into the full k8s-openapi type (with only the kept fields set) for the code that reads it,
//! so there is one reading of each field, not two.
//!
//! What is kept, per kind:
//! - Pod: name, namespace, labels; `spec.nodeName`, `spec.hostNetwork`, the containers' (and
//!   sidecars') names, restart policies and ports; `status.phase`, `status.podIP(s)`.
//! - Namespace: name, labels.
//! - NetworkPolicy: name, namespace, `spec`.
//! - Node: name, uid, creationTimestamp, the `kwire.dev/` annotations; `spec.podCIDR(s)`;
//!   `status.addresses`; the type and status of `status.conditions` (a relay must be Ready).
//! - Service: name, namespace; `spec`, `status` (ports, addresses, policies: small). Its
//!   managedFields and annotations (often a `last-applied-configuration` copy of the whole
//!   object) are skipped.
//! - EndpointSlice: name, namespace, labels; `addressType`, `ports`, `endpoints`.

use std::borrow::Cow;
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1 as corev1;
use k8s_openapi::api::discovery::v1 as discoveryv1;
use k8s_openapi::api::networking::v1 as netv1;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use serde::de::{DeserializeSeed as _, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

/// The annotations a Node view keeps (kwire's own).
pub const KEPT_ANNOTATION_PREFIX: &str = "kwire.dev/";

/// The metadata every view keeps: identity and resourceVersion (the watcher resumes from it).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PlainMeta {
    name: Option<String>,
    namespace: Option<String>,
    resource_version: Option<String>,
    uid: Option<String>,
}

/// [`PlainMeta`] and the labels (spelled out: `serde(flatten)` would buffer every skipped
/// field).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LabelledMeta {
    name: Option<String>,
    namespace: Option<String>,
    resource_version: Option<String>,
    uid: Option<String>,
    labels: Option<BTreeMap<String, String>>,
}

fn plain_meta<'de, D: Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    let m = PlainMeta::deserialize(d)?;
    Ok(ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        resource_version: m.resource_version,
        uid: m.uid,
        ..ObjectMeta::default()
    })
}

fn labelled_meta<'de, D: Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    let m = LabelledMeta::deserialize(d)?;
    Ok(ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        resource_version: m.resource_version,
        uid: m.uid,
        labels: m.labels,
        ..ObjectMeta::default()
    })
}

/// Implements [`kube::Resource`] for a view with the type information of the k8s-openapi type
/// it stands for.
macro_rules! view_of {
    ($view:ty, $full:ty) => {
        impl kube::Resource for $view {
            type DynamicType = ();
            type Scope = <$full as k8s_openapi::Resource>::Scope;

            fn kind(_: &()) -> Cow<'_, str> {
                <$full as k8s_openapi::Resource>::KIND.into()
            }
            fn group(_: &()) -> Cow<'_, str> {
                <$full as k8s_openapi::Resource>::GROUP.into()
            }
            fn version(_: &()) -> Cow<'_, str> {
                <$full as k8s_openapi::Resource>::VERSION.into()
            }
            fn plural(_: &()) -> Cow<'_, str> {
                <$full as k8s_openapi::Resource>::URL_PATH_SEGMENT.into()
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

/// A Pod as NetworkPolicy reads it.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct PodView {
    #[serde(deserialize_with = "labelled_meta")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    spec: Option<PodSpecView>,
    #[serde(default)]
    status: Option<PodStatusView>,
}
view_of!(PodView, corev1::Pod);

// The spec and status parts of a Pod view are generic in their strings: `String` in the view
// the index is given, [`Text`] (borrowed from the watch line) in [`PodView::fingerprint_line`],
// which hashes them without allocating. Both derive the same `Hash`, field for field.
#[derive(Clone, Debug, Default, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodSpecView<S = String> {
    node_name: Option<S>,
    host_network: Option<bool>,
    #[serde(default)]
    containers: Vec<ContainerView<S>>,
    init_containers: Option<Vec<ContainerView<S>>>,
}

#[derive(Clone, Debug, Default, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ContainerView<S = String> {
    #[serde(default)]
    name: S,
    restart_policy: Option<S>,
    ports: Option<Vec<PortView<S>>>,
}

/// `corev1::ContainerPort`, field for field (with `Hash`, which the k8s-openapi type lacks);
/// a missing or null number or IP reads as k8s-openapi reads it, as the default.
#[derive(Clone, Debug, Default, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PortView<S = String> {
    container_port: Option<i32>,
    #[serde(rename = "hostIP")]
    host_ip: Option<S>,
    host_port: Option<i32>,
    name: Option<S>,
    protocol: Option<S>,
}

impl ContainerView {
    fn into_k8s(self) -> corev1::Container {
        corev1::Container {
            name: self.name,
            restart_policy: self.restart_policy,
            ports: self.ports.map(|p| {
                p.into_iter()
                    .map(|p| corev1::ContainerPort {
                        container_port: p.container_port.unwrap_or_default(),
                        host_ip: p.host_ip,
                        host_port: p.host_port,
                        name: p.name,
                        protocol: p.protocol,
                    })
                    .collect()
            }),
            ..corev1::Container::default()
        }
    }
}

#[derive(Clone, Debug, Default, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodStatusView<S = String> {
    phase: Option<S>,
    #[serde(rename = "podIP")]
    pod_ip: Option<S>,
    #[serde(rename = "podIPs")]
    pod_ips: Option<Vec<PodIpView<S>>>,
}

/// `corev1::PodIP` (with `Hash`).
#[derive(Clone, Debug, Default, Hash, Deserialize)]
struct PodIpView<S = String> {
    ip: Option<S>,
}

/// An object as a view's `fingerprint_line` reads it: what the view keeps, its strings
/// borrowed from the line (see [`PodText`], [`NodeText`]).
#[derive(Deserialize)]
struct ObjectText<M, Spec, Status> {
    metadata: Option<M>,
    spec: Option<Spec>,
    status: Option<Status>,
}

/// A Pod as [`PodView::fingerprint_line`] reads it.
type PodText<'a> = ObjectText<MetaText<'a>, PodSpecView<Text<'a>>, PodStatusView<Text<'a>>>;

/// [`LabelledMeta`], borrowed.
#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct MetaText<'a> {
    #[serde(borrow)]
    name: Option<Text<'a>>,
    #[serde(borrow)]
    namespace: Option<Text<'a>>,
    #[serde(borrow)]
    resource_version: Option<Text<'a>>,
    #[serde(borrow)]
    uid: Option<Text<'a>>,
    #[serde(borrow, default, deserialize_with = "labels_text")]
    labels: Option<Pairs<'a>>,
}

/// Labels borrowed, in the order and with the values a `BTreeMap` would hold (sorted by key;
/// a key given twice keeps its last value).
fn labels_text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Pairs<'de>>, D::Error> {
    d.deserialize_option(OptionalMap(SortedPairs(|_| true)))
}

/// [`kwire_annotations`], borrowed: only the [`KEPT_ANNOTATION_PREFIX`] keys, sorted as
/// [`labels_text`] sorts them.
fn kwire_text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Pairs<'de>>, D::Error> {
    d.deserialize_option(OptionalMap(SortedPairs(|k| {
        k.starts_with(KEPT_ANNOTATION_PREFIX)
    })))
}

/// A map of strings borrowed as sorted pairs.
type Pairs<'a> = Vec<(Text<'a>, Text<'a>)>;

/// Reads the pairs whose key the function keeps (the others skipped), sorted by key, a key
/// given twice with its last value: as a `BTreeMap` of them would hold them.
struct SortedPairs(fn(&str) -> bool);

impl<'de> ReadMap<'de> for SortedPairs {
    type Value = Pairs<'de>;
    fn read<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
        let mut pairs = Vec::with_capacity(m.size_hint().unwrap_or(8));
        while let Some(k) = m.next_key::<Text<'de>>()? {
            if (self.0)(k.as_str()) {
                pairs.push((k, m.next_value::<Text<'de>>()?));
            } else {
                m.next_value::<IgnoredAny>()?;
            }
        }
        // A stable sort keeps a repeated key's values in their order; the last one stays.
        pairs.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
        let mut out: Pairs<'de> = Vec::with_capacity(pairs.len());
        for (k, v) in pairs {
            match out.last_mut() {
                Some(last) if last.0.as_str() == k.as_str() => last.1 = v,
                _ => out.push((k, v)),
            }
        }
        Ok(out)
    }
}

/// How [`OptionalMap`] reads a map.
trait ReadMap<'de> {
    type Value;
    fn read<A: MapAccess<'de>>(self, m: A) -> Result<Self::Value, A::Error>;
}

/// A map of strings read by `R`, or null (`None`).
struct OptionalMap<R>(R);

impl<'de, R: ReadMap<'de>> Visitor<'de> for OptionalMap<R> {
    type Value = Option<R::Value>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a map of strings, or null")
    }
    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
    fn visit_map<A: MapAccess<'de>>(self, m: A) -> Result<Self::Value, A::Error> {
        self.0.read(m).map(Some)
    }
}

/// Feeds an object's content to `h`, one way for a view and for its borrowed reading: its
/// identity field by field, its maps of strings pair by pair (sorted by key, as a view's
/// `BTreeMap` and a borrowed [`Pairs`] both hold them; so the two readings hash alike by
/// construction, not by the standard library's choices), then the rest (one generic struct
/// for both readings, with one derived `Hash`).
fn hash_object<'a, H, I, const N: usize>(
    ids: &[Option<&str>],
    maps: [Option<(usize, I)>; N],
    rest: &impl std::hash::Hash,
    h: &mut H,
) where
    H: std::hash::Hasher,
    I: Iterator<Item = (&'a str, &'a str)>,
{
    use std::hash::Hash;
    ids.hash(h);
    for map in maps {
        match map {
            None => h.write_u8(0),
            Some((n, pairs)) => {
                h.write_u8(1);
                h.write_usize(n);
                for (k, v) in pairs {
                    k.hash(h);
                    v.hash(h);
                }
            }
        }
    }
    rest.hash(h);
}

/// A view's map of strings, for [`hash_object`].
fn tree_pairs(
    m: &Option<BTreeMap<String, String>>,
) -> Option<(usize, impl Iterator<Item = (&str, &str)>)> {
    m.as_ref()
        .map(|m| (m.len(), m.iter().map(|(k, v)| (k.as_str(), v.as_str()))))
}

/// A borrowed reading's map of strings, for [`hash_object`].
fn text_pairs<'a>(
    m: &'a Option<Pairs<'_>>,
) -> Option<(usize, impl Iterator<Item = (&'a str, &'a str)>)> {
    m.as_ref()
        .map(|m| (m.len(), m.iter().map(|(k, v)| (k.as_str(), v.as_str()))))
}

/// An optional borrowed string as `Option<&str>`.
fn opt_str<'a>(t: &'a Option<Text<'_>>) -> Option<&'a str> {
    t.as_ref().map(Text::as_str)
}

/// A view a filter keeps fingerprints of, from the view as decoded and from its text (see
/// `watches::Prints`): the two readings of one object hash alike.
pub trait Printed {
    /// What identifies the object (it is hashed into [`Fingerprint::key`]).
    type Key<'a>: std::hash::Hash
    where
        Self: 'a;
    fn key(&self) -> Self::Key<'_>;
    /// Everything the view keeps but its resourceVersion.
    fn hash_content<H: std::hash::Hasher>(&self, h: &mut H);
    /// The object's text read for the same, `None` when it is not read alike.
    fn fingerprint_line(text: &str, keys: &impl std::hash::BuildHasher) -> Option<Fingerprint>;
}

impl Printed for PodView {
    type Key<'a> = (Option<&'a str>, Option<&'a str>);

    /// Feeds everything the view keeps but its resourceVersion to `h`: two views that hash
    /// alike differ in nothing NetworkPolicy reads. The metadata is hashed field by field
    /// (the view keeps only these, see `labelled_meta`); spec and status by their derived
    /// `Hash`, so a field added to them is hashed without a change here.
    fn hash_content<H: std::hash::Hasher>(&self, h: &mut H) {
        let m = &self.metadata;
        hash_object(
            &[&m.name, &m.namespace, &m.uid].map(Option::as_deref),
            [tree_pairs(&m.labels)],
            &(&self.spec, &self.status),
            h,
        );
    }

    /// The (namespace, name) a Pod filter keys its fingerprints by.
    fn key(&self) -> Self::Key<'_> {
        (
            self.metadata.namespace.as_deref(),
            self.metadata.name.as_deref(),
        )
    }

    /// A Pod's JSON text read as [`PodView`] reads it, without allocating for what it keeps:
    /// its key ([`PodView::key`]) hashed with `keys`, its content hashed as
    /// [`PodView::hash_content`] hashes the view of the same text, and its resourceVersion.
    /// `None` when the text is not a Pod the view would read alike (the caller decodes it).
    fn fingerprint_line(text: &str, keys: &impl std::hash::BuildHasher) -> Option<Fingerprint> {
        let pod = PodText::deserialize(&mut serde_json::Deserializer::from_str(text)).ok()?;
        let m = pod.metadata.unwrap_or_default();
        let rv = m.resource_version.as_ref()?.as_str().to_string();
        let key = keys.hash_one((opt_str(&m.namespace), opt_str(&m.name)));
        let mut h = keys.build_hasher();
        hash_object(
            &[&m.name, &m.namespace, &m.uid].map(opt_str),
            [text_pairs(&m.labels)],
            &(&pod.spec, &pod.status),
            &mut h,
        );
        Some(Fingerprint {
            key,
            content: std::hash::Hasher::finish(&h),
            resource_version: rv,
        })
    }
}

impl PodView {
    /// The k8s-openapi Pod with the kept fields set.
    pub fn into_k8s(self) -> corev1::Pod {
        corev1::Pod {
            metadata: self.metadata,
            spec: self.spec.map(|s| corev1::PodSpec {
                node_name: s.node_name,
                host_network: s.host_network,
                containers: s
                    .containers
                    .into_iter()
                    .map(ContainerView::into_k8s)
                    .collect(),
                init_containers: s
                    .init_containers
                    .map(|c| c.into_iter().map(ContainerView::into_k8s).collect()),
                ..corev1::PodSpec::default()
            }),
            status: self.status.map(|s| corev1::PodStatus {
                phase: s.phase,
                pod_ip: s.pod_ip,
                pod_ips: s.pod_ips.map(|v| {
                    v.into_iter()
                        .map(|p| corev1::PodIP {
                            ip: p.ip.unwrap_or_default(),
                        })
                        .collect()
                }),
                ..corev1::PodStatus::default()
            }),
        }
    }
}

/// A Namespace as NetworkPolicy reads it: its name and labels.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct NamespaceView {
    #[serde(deserialize_with = "labelled_meta")]
    pub metadata: ObjectMeta,
}
view_of!(NamespaceView, corev1::Namespace);

impl NamespaceView {
    pub fn into_k8s(self) -> corev1::Namespace {
        corev1::Namespace {
            metadata: self.metadata,
            ..corev1::Namespace::default()
        }
    }
}

/// A NetworkPolicy without its metadata's extras (annotations such as kubectl's
/// last-applied-configuration copy the whole policy; managedFields more than that).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct NetworkPolicyView {
    #[serde(deserialize_with = "plain_meta")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    spec: Option<netv1::NetworkPolicySpec>,
}
view_of!(NetworkPolicyView, netv1::NetworkPolicy);

impl NetworkPolicyView {
    pub fn into_k8s(self) -> netv1::NetworkPolicy {
        netv1::NetworkPolicy {
            metadata: self.metadata,
            spec: self.spec,
        }
    }
}

/// A Node's metadata as peer selection reads it: identity, age, kwire's annotations.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct NodeMeta {
    name: Option<String>,
    resource_version: Option<String>,
    uid: Option<String>,
    creation_timestamp: Option<Time>,
    #[serde(default, deserialize_with = "kwire_annotations")]
    annotations: Option<BTreeMap<String, String>>,
    /// kwire's labels only (`kwire.dev/location`), skipped like the annotations.
    #[serde(default, deserialize_with = "kwire_annotations")]
    labels: Option<BTreeMap<String, String>>,
}

fn node_meta<'de, D: Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    let m = NodeMeta::deserialize(d)?;
    Ok(ObjectMeta {
        name: m.name,
        resource_version: m.resource_version,
        uid: m.uid,
        creation_timestamp: m.creation_timestamp,
        annotations: m.annotations,
        labels: m.labels,
        ..ObjectMeta::default()
    })
}

/// A string borrowed from the input when it can be (one without escapes), owned otherwise.
/// It hashes as `str` and `String` hash, so a view of `Text` hashes as the same view of
/// `String`.
#[derive(Debug)]
pub enum Text<'de> {
    Borrowed(&'de str),
    Owned(String),
}

impl Text<'_> {
    pub fn as_str(&self) -> &str {
        match self {
            Text::Borrowed(s) => s,
            Text::Owned(s) => s,
        }
    }
}

impl Default for Text<'_> {
    fn default() -> Self {
        Text::Borrowed("")
    }
}

impl std::hash::Hash for Text<'_> {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.as_str().hash(h)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Text<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Text::Borrowed(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Text::Owned(v.to_string()))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(Text::Owned(v))
            }
        }
        d.deserialize_str(V(std::marker::PhantomData))
    }
}

/// What [`PodView::fingerprint_line`] reads from a Pod's text.
#[derive(Debug, PartialEq, Eq)]
pub struct Fingerprint {
    /// The (namespace, name) key, hashed.
    pub key: u64,
    /// Everything the view keeps but the resourceVersion, hashed.
    pub content: u64,
    pub resource_version: String,
}

/// `metadata.annotations`, keeping only [`KEPT_ANNOTATION_PREFIX`] keys: the others (kubeadm's,
/// cloud providers', last-applied-configuration) are skipped unallocated.
fn kwire_annotations<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<BTreeMap<String, String>>, D::Error> {
    struct Kwire;
    impl<'de> ReadMap<'de> for Kwire {
        type Value = BTreeMap<String, String>;
        fn read<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some(k) = m.next_key::<Text<'de>>()? {
                if k.as_str().starts_with(KEPT_ANNOTATION_PREFIX) {
                    out.insert(k.as_str().to_string(), m.next_value::<String>()?);
                } else {
                    m.next_value::<IgnoredAny>()?;
                }
            }
            Ok(out)
        }
    }
    d.deserialize_option(OptionalMap(Kwire))
}

/// What a text fingerprint ([`fingerprint_text`]) reads of an object besides its name,
/// namespace and uid: fields of its metadata and fields at its top level, each hashed whole.
/// It must name everything the object's view keeps (a field left out would let a change of
/// it be dropped); naming more only lets more updates through.
pub struct Kept {
    pub metadata: &'static [&'static str],
    pub fields: &'static [&'static str],
}

/// What [`ServiceObjView`] keeps.
pub const SERVICE_KEPT: Kept = Kept {
    metadata: &[],
    fields: &["spec", "status"],
};

/// What [`EndpointSliceView`] keeps.
pub const SLICE_KEPT: Kept = Kept {
    metadata: &["labels"],
    fields: &["addressType", "ports", "endpoints"],
};

/// An object's JSON text read for what `kept` names, without decoding it: its
/// (namespace, name) key hashed with `keys`, the kept fields (with their names, in the order
/// the text gives them) and its identity hashed into its content, and its resourceVersion.
/// Texts of one object from one API server hash alike when the kept fields are alike (the
/// server writes them in one order); spelled differently, they only hash apart. `None` for
/// text that is not an object with a resourceVersion.
pub fn fingerprint_text(
    text: &str,
    keys: &impl std::hash::BuildHasher,
    kept: &Kept,
) -> Option<Fingerprint> {
    let mut h = keys.build_hasher();
    let ident = top_level(kept, &mut h)
        .deserialize(&mut serde_json::Deserializer::from_str(text))
        .ok()?;
    finish_print(ident, keys, h)
}

/// The fingerprints of a list body's items ([`fingerprint_text`] of each), `None` for a body
/// that is not a list of such objects.
pub fn fingerprint_list(
    body: &str,
    keys: &impl std::hash::BuildHasher,
    kept: &Kept,
) -> Option<Vec<Fingerprint>> {
    struct ListV<'k, B> {
        keys: &'k B,
        kept: &'k Kept,
    }
    impl<'de, B: std::hash::BuildHasher> Visitor<'de> for ListV<'_, B> {
        type Value = Vec<Fingerprint>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a list")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(k) = m.next_key::<Text<'de>>()? {
                if k.as_str() == "items" {
                    out = m.next_value_seed(ItemsV {
                        keys: self.keys,
                        kept: self.kept,
                    })?;
                } else {
                    m.next_value::<IgnoredAny>()?;
                }
            }
            Ok(out)
        }
    }
    struct ItemsV<'k, B> {
        keys: &'k B,
        kept: &'k Kept,
    }
    impl<'de, B: std::hash::BuildHasher> serde::de::DeserializeSeed<'de> for ItemsV<'_, B> {
        type Value = Vec<Fingerprint>;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_seq(self)
        }
    }
    impl<'de, B: std::hash::BuildHasher> Visitor<'de> for ItemsV<'_, B> {
        type Value = Vec<Fingerprint>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a list's items")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut s: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = Vec::with_capacity(s.size_hint().unwrap_or(0));
            loop {
                let mut h = self.keys.build_hasher();
                let Some(ident) = s.next_element_seed(top_level(self.kept, &mut h))? else {
                    return Ok(out);
                };
                if let Some(p) = finish_print(ident, self.keys, h) {
                    out.push(p);
                }
            }
        }
    }
    serde_json::Deserializer::from_str(body)
        .deserialize_map(ListV { keys, kept })
        .ok()
}

/// The reading of an object's text for what `kept` names ([`LevelSeed`]).
fn top_level<'k, H>(kept: &Kept, h: &'k mut H) -> LevelSeed<'k, H> {
    LevelSeed {
        fields: kept.fields,
        metadata: Some(kept.metadata),
        h,
    }
}

/// The identity an object's text gave ([`LevelSeed`]).
#[derive(Default)]
struct Ident<'a> {
    name: Option<Text<'a>>,
    namespace: Option<Text<'a>>,
    uid: Option<Text<'a>>,
    resource_version: Option<Text<'a>>,
}

fn finish_print<H: std::hash::Hasher>(
    ident: Ident<'_>,
    keys: &impl std::hash::BuildHasher,
    mut h: H,
) -> Option<Fingerprint> {
    use std::hash::Hash;
    let rv = ident.resource_version.as_ref()?.as_str().to_string();
    let (ns, name) = (opt_str(&ident.namespace), opt_str(&ident.name));
    (ns, name, opt_str(&ident.uid)).hash(&mut h);
    Some(Fingerprint {
        key: keys.hash_one((ns, name)),
        content: h.finish(),
        resource_version: rv,
    })
}

/// Reads one level of an object's text, the rest skipped: at the top (`metadata` given) the
/// `fields` it names hashed into `h`, its metadata read one level down; in the metadata
/// (`metadata` none) the identity kept and the `fields` it names hashed.
struct LevelSeed<'k, H> {
    fields: &'static [&'static str],
    metadata: Option<&'static [&'static str]>,
    h: &'k mut H,
}

impl<'de, H: std::hash::Hasher> serde::de::DeserializeSeed<'de> for LevelSeed<'_, H> {
    type Value = Ident<'de>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, H: std::hash::Hasher> Visitor<'de> for LevelSeed<'_, H> {
    type Value = Ident<'de>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
        use std::hash::Hash;
        let mut ident = Ident::default();
        while let Some(k) = m.next_key::<Text<'de>>()? {
            let slot = match (self.metadata, k.as_str()) {
                (Some(fields), "metadata") => {
                    ident = m.next_value_seed(LevelSeed {
                        fields,
                        metadata: None,
                        h: &mut *self.h,
                    })?;
                    continue;
                }
                (None, "name") => &mut ident.name,
                (None, "namespace") => &mut ident.namespace,
                (None, "uid") => &mut ident.uid,
                (None, "resourceVersion") => &mut ident.resource_version,
                (_, field) if self.fields.contains(&field) => {
                    field.hash(self.h);
                    m.next_value_seed(HashTree(&mut *self.h))?;
                    continue;
                }
                _ => {
                    m.next_value::<IgnoredAny>()?;
                    continue;
                }
            };
            *slot = m.next_value::<Option<Text<'de>>>()?;
        }
        Ok(ident)
    }
}

/// Hashes a JSON value whole into its hasher: every scalar with a tag of its type, every map
/// and array with its bounds, so that two values hash alike only when they are alike (given
/// as one writer gives them: keys in the same order).
struct HashTree<'h, H>(&'h mut H);

impl<'de, H: std::hash::Hasher> serde::de::DeserializeSeed<'de> for HashTree<'_, H> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, H: std::hash::Hasher> Visitor<'de> for HashTree<'_, H> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<(), E> {
        self.0.write_u8(1);
        self.0.write_u8(v.into());
        Ok(())
    }
    fn visit_i64<E>(self, v: i64) -> Result<(), E> {
        self.0.write_u8(2);
        self.0.write_i64(v);
        Ok(())
    }
    fn visit_u64<E>(self, v: u64) -> Result<(), E> {
        self.0.write_u8(3);
        self.0.write_u64(v);
        Ok(())
    }
    fn visit_f64<E>(self, v: f64) -> Result<(), E> {
        self.0.write_u8(4);
        self.0.write_u64(v.to_bits());
        Ok(())
    }
    fn visit_str<E>(self, v: &str) -> Result<(), E> {
        use std::hash::Hash;
        self.0.write_u8(5);
        v.hash(self.0);
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        self.0.write_u8(6);
        Ok(())
    }
    fn visit_none<E>(self) -> Result<(), E> {
        self.0.write_u8(6);
        Ok(())
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut s: A) -> Result<(), A::Error> {
        self.0.write_u8(7);
        while s.next_element_seed(HashTree(&mut *self.0))?.is_some() {}
        self.0.write_u8(8);
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<(), A::Error> {
        use std::hash::Hash;
        self.0.write_u8(9);
        while let Some(k) = m.next_key::<Text<'de>>()? {
            k.hash(self.0);
            m.next_value_seed(HashTree(&mut *self.0))?;
        }
        self.0.write_u8(10);
        Ok(())
    }
}

/// A Service as the service table reads it (see [`crate::services::ServiceView::from_parts`]).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ServiceObjView {
    #[serde(deserialize_with = "plain_meta")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Option<corev1::ServiceSpec>,
    #[serde(default)]
    pub status: Option<corev1::ServiceStatus>,
}
view_of!(ServiceObjView, corev1::Service);

/// An EndpointSlice as the service table reads it (see
/// [`crate::services::SliceView::from_parts`]).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSliceView {
    #[serde(deserialize_with = "labelled_meta")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub address_type: String,
    #[serde(default)]
    pub ports: Option<Vec<discoveryv1::EndpointPort>>,
    #[serde(default)]
    pub endpoints: Vec<discoveryv1::Endpoint>,
}
view_of!(EndpointSliceView, discoveryv1::EndpointSlice);

/// A Node as peer selection reads it.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct NodeView {
    #[serde(deserialize_with = "node_meta")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    spec: Option<NodeSpecView>,
    #[serde(default)]
    status: Option<NodeStatusView>,
}
view_of!(NodeView, corev1::Node);

// As a Pod view's, the spec and status parts of a Node view are generic in their strings:
// `String` in the view the planner is given, [`Text`] in [`NodeView::fingerprint_line`].
#[derive(Clone, Debug, Default, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NodeSpecView<S = String> {
    #[serde(rename = "podCIDR")]
    pod_cidr: Option<S>,
    #[serde(rename = "podCIDRs")]
    pod_cidrs: Option<Vec<S>>,
}

#[derive(Clone, Debug, Default, Hash, Deserialize)]
struct NodeStatusView<S = String> {
    addresses: Option<Vec<AddressView<S>>>,
    conditions: Option<Vec<ConditionView<S>>>,
}

/// `corev1::NodeAddress`, field for field (with `Hash`); a missing or null field reads as
/// k8s-openapi reads it, as empty.
#[derive(Clone, Debug, Default, Hash, Deserialize)]
struct AddressView<S = String> {
    address: Option<S>,
    #[serde(rename = "type")]
    type_: Option<S>,
}

/// A Node condition's type and status (heartbeat and transition times, reasons and messages
/// are skipped: they change without changing what kwire reads).
#[derive(Clone, Debug, Default, Hash, Deserialize)]
struct ConditionView<S = String> {
    #[serde(rename = "type")]
    type_: S,
    status: S,
}

/// A Node as [`NodeView::fingerprint_line`] reads it.
type NodeText<'a> = ObjectText<NodeMetaText<'a>, NodeSpecView<Text<'a>>, NodeStatusView<Text<'a>>>;

/// [`NodeMeta`], borrowed.
#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NodeMetaText<'a> {
    #[serde(borrow)]
    name: Option<Text<'a>>,
    #[serde(borrow)]
    resource_version: Option<Text<'a>>,
    #[serde(borrow)]
    uid: Option<Text<'a>>,
    creation_timestamp: Option<Time>,
    #[serde(borrow, default, deserialize_with = "kwire_text")]
    annotations: Option<Pairs<'a>>,
    #[serde(borrow, default, deserialize_with = "kwire_text")]
    labels: Option<Pairs<'a>>,
}

impl Printed for NodeView {
    type Key<'a> = Option<&'a str>;

    /// Feeds everything the view keeps but its resourceVersion to `h` (as
    /// [`PodView::hash_content`] does): two views that hash alike differ in nothing peer
    /// selection reads.
    fn hash_content<H: std::hash::Hasher>(&self, h: &mut H) {
        let m = &self.metadata;
        hash_object(
            &[&m.name, &m.uid].map(Option::as_deref),
            [tree_pairs(&m.annotations), tree_pairs(&m.labels)],
            &(
                m.creation_timestamp.as_ref().map(|t| t.0),
                &self.spec,
                &self.status,
            ),
            h,
        );
    }

    /// The name a Node filter keys its fingerprints by.
    fn key(&self) -> Self::Key<'_> {
        self.metadata.name.as_deref()
    }

    /// A Node's JSON text read as [`NodeView`] reads it (as [`PodView::fingerprint_line`]
    /// reads a Pod's): its key hashed with `keys`, its content hashed as
    /// [`NodeView::hash_content`] hashes the view of the same text, its resourceVersion.
    fn fingerprint_line(text: &str, keys: &impl std::hash::BuildHasher) -> Option<Fingerprint> {
        let node = NodeText::deserialize(&mut serde_json::Deserializer::from_str(text)).ok()?;
        let m = node.metadata.unwrap_or_default();
        let rv = m.resource_version.as_ref()?.as_str().to_string();
        let mut h = keys.build_hasher();
        hash_object(
            &[&m.name, &m.uid].map(opt_str),
            [text_pairs(&m.annotations), text_pairs(&m.labels)],
            &(
                m.creation_timestamp.as_ref().map(|t| t.0),
                &node.spec,
                &node.status,
            ),
            &mut h,
        );
        Some(Fingerprint {
            key: keys.hash_one(opt_str(&m.name)),
            content: std::hash::Hasher::finish(&h),
            resource_version: rv,
        })
    }
}

impl NodeView {
    pub fn into_k8s(self) -> corev1::Node {
        corev1::Node {
            metadata: self.metadata,
            spec: self.spec.map(|s| corev1::NodeSpec {
                pod_cidr: s.pod_cidr,
                pod_cidrs: s.pod_cidrs,
                ..corev1::NodeSpec::default()
            }),
            status: self.status.map(|s| corev1::NodeStatus {
                addresses: s.addresses.map(|a| {
                    a.into_iter()
                        .map(|a| corev1::NodeAddress {
                            address: a.address.unwrap_or_default(),
                            type_: a.type_.unwrap_or_default(),
                        })
                        .collect()
                }),
                conditions: s.conditions.map(|c| {
                    c.into_iter()
                        .map(|c| corev1::NodeCondition {
                            type_: c.type_,
                            status: c.status,
                            ..corev1::NodeCondition::default()
                        })
                        .collect()
                }),
                ..corev1::NodeStatus::default()
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::Resource;

    /// A Pod as a kubelet-managed cluster serves it, trimmed to one of each part.
    fn full_pod(annotation: &str, heartbeat: &str) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": "web-7d9c-x2x8f", "generateName": "web-7d9c-", "namespace": "shop",
                "uid": "5b1e", "resourceVersion": "4711", "creationTimestamp": "2025-01-01T00:00:00Z",
                "labels": {"app": "web", "pod-template-hash": "7d9c"},
                "annotations": {"kubectl.kubernetes.io/restartedAt": annotation},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d9c", "uid": "u", "controller": true}],
                "managedFields": [{"manager": "kubelet", "operation": "Update", "apiVersion": "v1",
                    "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {"f:conditions": {"k:{\"type\":\"Ready\"}": {".": {}}}}}}]
            },
            "spec": {
                "nodeName": "n1",
                "containers": [{"name": "web", "image": "nginx:1.27",
                    "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                    "env": [{"name": "A", "value": "b"}],
                    "resources": {"requests": {"cpu": "100m"}}}],
                "initContainers": [{"name": "proxy", "image": "envoy", "restartPolicy": "Always",
                    "ports": [{"name": "admin", "containerPort": 9901}]}],
                "volumes": [{"name": "v", "emptyDir": {}}]
            },
            "status": {
                "phase": "Running", "podIP": "10.244.1.5", "podIPs": [{"ip": "10.244.1.5"}],
                "hostIP": "192.0.2.1",
                "conditions": [{"type": "Ready", "status": "True", "lastProbeTime": heartbeat}],
                "containerStatuses": [{"name": "web", "ready": true, "restartCount": 0, "image": "nginx", "imageID": "x"}]
            }
        })
    }

    #[test]
    fn pod_view_keeps_what_policy_reads() {
        let view: PodView = serde_json::from_value(full_pod("a", "2025-01-01T00:00:01Z")).unwrap();
        assert_eq!(view.metadata.resource_version.as_deref(), Some("4711"));
        assert!(view.metadata.annotations.is_none() && view.metadata.managed_fields.is_none());
        let from_view = crate::policy::Pod::from_k8s(&view.into_k8s()).unwrap();
        let full: corev1::Pod =
            serde_json::from_value(full_pod("a", "2025-01-01T00:00:01Z")).unwrap();
        assert_eq!(from_view, crate::policy::Pod::from_k8s(&full).unwrap());
        assert_eq!(from_view.container_ports.len(), 2, "sidecar ports count");
    }

    #[test]
    fn heartbeat_and_annotation_do_not_change_the_model() {
        let read = |a, h| {
            let v: PodView = serde_json::from_value(full_pod(a, h)).unwrap();
            crate::policy::Pod::from_k8s(&v.into_k8s()).unwrap()
        };
        assert_eq!(
            read("a", "2025-01-01T00:00:01Z"),
            read("b", "2025-01-01T00:05:01Z")
        );
    }

    /// A Pod's labels as the view reads them (from the bytes, as a watch does) become the map
    /// k8s-openapi reads from the same bytes: escapes in keys and values, a key listed twice
    /// (its last value), empty, null and absent labels.
    #[test]
    fn pod_labels_read_as_k8s_openapi_reads_them() {
        let cases = [
            r#"{"app": "web", "tier": "front"}"#,
            r#"{"a\"b": "c\\d", "\u00e9t\u00e9": "\n", "k8s.io/x": "y\/z"}"#,
            r#"{"app": "web", "app": "db", "z": "1", "a": "2"}"#,
            r#"{"": ""}"#,
            "{}",
            "null",
        ];
        for labels in cases {
            let text = format!(
                r#"{{"metadata": {{"name": "p", "namespace": "x", "labels": {labels}, "annotations": {{"a": "b"}}}}, "status": {{"phase": "Running"}}}}"#
            );
            let view: PodView = serde_json::from_str(&text).unwrap();
            let full: corev1::Pod = serde_json::from_str(&text).unwrap();
            assert_eq!(
                view.into_k8s().metadata.labels,
                full.metadata.labels,
                "{labels}"
            );
            // From a Value too (owned strings, no borrowing).
            let value: serde_json::Value = serde_json::from_str(&text).unwrap();
            let view: PodView = serde_json::from_value(value).unwrap();
            assert_eq!(
                view.into_k8s().metadata.labels,
                full.metadata.labels,
                "{labels}"
            );
        }
        let absent: PodView = serde_json::from_str(r#"{"metadata": {"name": "p"}}"#).unwrap();
        assert_eq!(absent.into_k8s().metadata.labels, None);
        // Not a map of strings: refused, as k8s-openapi refuses it.
        for bad in [r#"{"a": 1}"#, r#"["a"]"#, r#""a""#] {
            let text = format!(r#"{{"metadata": {{"name": "p", "labels": {bad}}}}}"#);
            assert!(serde_json::from_str::<PodView>(&text).is_err(), "{bad}");
            assert!(serde_json::from_str::<corev1::Pod>(&text).is_err(), "{bad}");
        }
    }

    /// Every change of a Pod's labels changes its fingerprint (so the Pod filter passes it),
    /// including a boundary moved between a key and its value and empty versus absent labels;
    /// a heartbeat or an annotation does not.
    #[test]
    fn a_label_change_changes_the_fingerprint() {
        use std::hash::{BuildHasher, Hasher};
        let s = std::hash::RandomState::new();
        let print = |labels: &str, annotation: &str| {
            let text = format!(
                r#"{{"metadata": {{"name": "p", "namespace": "x", "uid": "u", "resourceVersion": "{annotation}", {labels} "annotations": {{"a": "{annotation}"}}}}, "status": {{"phase": "Running"}}}}"#
            );
            let view: PodView = serde_json::from_str(&text).unwrap();
            let mut h = s.build_hasher();
            view.hash_content(&mut h);
            h.finish()
        };
        let variants = [
            r#""labels": {"app": "web"},"#,
            r#""labels": {"app": "db"},"#,
            r#""labels": {"ap": "pweb"},"#,
            r#""labels": {"app": "web", "tier": "front"},"#,
            r#""labels": {"tier": "front"},"#,
            r#""labels": {"app": "w\u0065b2"},"#,
            r#""labels": {},"#,
            r#""labels": {"": ""},"#,
            "",
        ];
        let prints: Vec<u64> = variants.iter().map(|l| print(l, "1")).collect();
        for (i, a) in prints.iter().enumerate() {
            for (j, b) in prints.iter().enumerate() {
                assert_eq!(a == b, i == j, "{} vs {}", variants[i], variants[j]);
            }
        }
        for (l, p) in variants.iter().zip(&prints) {
            assert_eq!(
                print(l, "2"),
                *p,
                "an annotation and resourceVersion alone: {l}"
            );
        }
        // The same labels spelled with an escape read alike.
        assert_eq!(print(r#""labels": {"app": "w\u0065b"},"#, "1"), prints[0]);
    }

    /// A Pod's text fingerprinted without decoding it hashes as its decoded view does, for
    /// labels as `pod_labels_read_as_k8s_openapi_reads_them` spells them (escapes, a repeated
    /// key, empty, null, absent), with and without spec, status, init containers and ports;
    /// the key is the view's.
    #[test]
    fn a_pods_text_fingerprints_as_its_view_hashes() {
        use std::hash::{BuildHasher, Hasher};
        let keys = std::hash::RandomState::new();
        let labels = [
            r#""labels": {"app": "web", "tier": "front"},"#,
            r#""labels": {"a\"b": "c\\d", "\u00e9t\u00e9": "\n", "k8s.io/x": "y\/z"},"#,
            r#""labels": {"app": "web", "app": "db", "z": "1", "a": "2"},"#,
            r#""labels": {"z": "1", "app": "db", "a": "2"},"#,
            r#""labels": {"": ""},"#,
            r#""labels": {},"#,
            r#""labels": null,"#,
            "",
        ];
        let rest = [
            String::new(),
            r#", "spec": {"nodeName": "n1", "hostNetwork": true, "containers": [{"name": "c"}]}"#
                .into(),
            r#", "status": {"phase": "Running", "podIP": "10.0.0.1", "podIPs": [{"ip": "10.0.0.1"}, {}]}"#
                .into(),
            {
                let full = full_pod("a", "t");
                format!(r#", "spec": {}, "status": {}"#, full["spec"], full["status"])
            },
        ];
        let mut prints = std::collections::HashSet::new();
        for l in labels {
            for r in &rest {
                let text = format!(
                    r#"{{"metadata": {{"name": "p\u0031", "namespace": "x", "uid": "u", "resourceVersion": "9", {l} "annotations": {{"a": "b"}}}}{r}}}"#
                );
                let view: PodView = serde_json::from_str(&text).expect(&text);
                let mut h = keys.build_hasher();
                view.hash_content(&mut h);
                let print = PodView::fingerprint_line(&text, &keys).expect(&text);
                assert_eq!(print.content, h.finish(), "{text}");
                assert_eq!(print.key, keys.hash_one(view.key()), "{text}");
                assert_eq!(print.resource_version, "9");
                prints.insert(print.content);
            }
        }
        // The third and fourth labels are one map spelled twice, null and absent labels read
        // alike; the others differ.
        assert_eq!(prints.len(), (labels.len() - 2) * rest.len());
        // What the view refuses is not fingerprinted either.
        for bad in [
            r#"{"metadata": {"resourceVersion": "1", "labels": {"a": 1}}}"#,
            r#"{"metadata": {"resourceVersion": "1"}, "spec": {"containers": {}}}"#,
        ] {
            assert!(PodView::fingerprint_line(bad, &keys).is_none(), "{bad}");
            assert!(serde_json::from_str::<PodView>(bad).is_err(), "{bad}");
        }
    }

    /// A text fingerprint reads what `Kept` names and the identity, nothing else; a listed
    /// item's is its text's; a number, a null, a nested array or a key moved between levels
    /// all count.
    #[test]
    fn text_fingerprints_read_only_the_kept_fields() {
        use std::hash::BuildHasher;
        let keys = std::hash::RandomState::new();
        let svc = |rv: u32, note: &str, spec: &str| {
            format!(
                r#"{{"apiVersion":"v1","kind":"Service","metadata":{{"name":"a","namespace":"x","uid":"u","resourceVersion":"{rv}","labels":{{"l":"{note}"}},"annotations":{{"n":"{note}"}},"managedFields":[{{"t":"{note}"}}]}},"spec":{spec},"status":{{"loadBalancer":{{}}}}}}"#
            )
        };
        let print = |t: &str| fingerprint_text(t, &keys, &SERVICE_KEPT).expect(t);
        let base = print(&svc(1, "a", r#"{"ports":[{"port":80}]}"#));
        assert_eq!(base.resource_version, "1");
        assert_eq!(base.key, keys.hash_one((Some("x"), Some("a"))));
        // Annotations, labels (a Service view keeps none), managedFields, resourceVersion.
        assert_eq!(
            print(&svc(2, "b", r#"{"ports":[{"port":80}]}"#)).content,
            base.content
        );
        let specs = [
            r#"{"ports":[{"port":81}]}"#,
            r#"{"ports":[{"port":"80"}]}"#,
            r#"{"ports":[{"port":80.0}]}"#,
            r#"{"ports":[{"port":null}]}"#,
            r#"{"ports":[[{"port":80}]]}"#,
            r#"{"ports":[{"port":80}],"type":"NodePort"}"#,
            r#"{"ports":[]}"#,
            "null",
        ];
        let mut contents = vec![base.content];
        for spec in specs {
            contents.push(print(&svc(3, "a", spec)).content);
        }
        let distinct: std::collections::HashSet<_> = contents.iter().collect();
        assert_eq!(distinct.len(), contents.len(), "every spec hashes apart");
        // A listed item fingerprints as its text does.
        let items = [
            svc(4, "a", r#"{"ports":[{"port":80}]}"#),
            svc(5, "c", "null"),
        ];
        let page = format!(
            r#"{{"kind":"ServiceList","metadata":{{"resourceVersion":"5"}},"items":[{}]}}"#,
            items.join(",")
        );
        let listed = fingerprint_list(&page, &keys, &SERVICE_KEPT).unwrap();
        assert_eq!(listed, items.iter().map(|t| print(t)).collect::<Vec<_>>());
        // An EndpointSlice keeps its labels (the Service it belongs to).
        let slice = |label: &str| {
            format!(
                r#"{{"metadata":{{"name":"s","resourceVersion":"1","labels":{{"kubernetes.io/service-name":"{label}"}}}},"addressType":"IPv4","endpoints":[]}}"#
            )
        };
        let sprint = |t: &str| fingerprint_text(t, &keys, &SLICE_KEPT).unwrap().content;
        assert_ne!(sprint(&slice("a")), sprint(&slice("b")));
        assert!(fingerprint_text(r#"{"metadata":{"name":"a"}}"#, &keys, &SERVICE_KEPT).is_none());
        assert!(fingerprint_text("[1]", &keys, &SERVICE_KEPT).is_none());
    }

    #[test]
    fn views_address_the_resources_they_stand_for() {
        assert_eq!(PodView::url_path(&(), None), "/api/v1/pods");
        assert_eq!(NamespaceView::url_path(&(), None), "/api/v1/namespaces");
        assert_eq!(
            NetworkPolicyView::url_path(&(), None),
            "/apis/networking.k8s.io/v1/networkpolicies"
        );
    }

    fn full_node(heartbeat: &str, ttl: &str) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "n2", "uid": "u2", "resourceVersion": "77",
                "creationTimestamp": "2025-01-01T00:00:00Z",
                "labels": {"kubernetes.io/hostname": "n2", "kwire.dev/location": "eu"},
                "annotations": {"kwire.dev/public-key": "AAAA", "kwire.dev/endpoint": "192.0.2.2:51820",
                    "node.alpha.kubernetes.io/ttl": ttl, "we\\ird": "x"},
                "managedFields": [{"manager": "kubelet", "fieldsV1": {"f:status": {}}}]},
            "spec": {"podCIDR": "10.244.2.0/24", "podCIDRs": ["10.244.2.0/24"], "providerID": "x"},
            "status": {
                "addresses": [{"type": "InternalIP", "address": "192.0.2.2"}, {"type": "Hostname", "address": "n2"}],
                "conditions": [{"type": "Ready", "status": "True", "lastHeartbeatTime": heartbeat}],
                "capacity": {"cpu": "4"},
                "images": [{"names": ["pause"], "sizeBytes": 1}]
            }
        })
    }

    /// A Node's text fingerprinted without decoding it hashes as its decoded view does: kwire's
    /// annotations and labels among others (escaped, repeated, empty, null, absent), with and
    /// without its creation time, spec and status (addresses with a field missing or null,
    /// conditions); the key is the view's. What the view skips (a heartbeat time, another
    /// controller's annotation, managedFields) leaves it as it was; what it keeps changes it.
    #[test]
    fn a_nodes_text_fingerprints_as_its_view_hashes() {
        use std::hash::{BuildHasher, Hasher};
        let keys = std::hash::RandomState::new();
        let maps = [
            r#""annotations": {"kwire.dev/public-key": "AAAA", "node.alpha.kubernetes.io/ttl": "0"}, "labels": {"kwire.dev/location": "eu"},"#,
            r#""annotations": {"kwire.dev/public-key": "AA\u0041A", "kwire.dev/endpoint": "192.0.2.2:51820", "we\\ird": "x"},"#,
            r#""annotations": {"kwire.dev/b": "1", "kwire.dev/a": "2", "kwire.dev/b": "3"},"#,
            r#""annotations": {"kwire.dev/a": "2", "kwire.dev/b": "3"},"#,
            r#""annotations": {"other": "x"}, "labels": {"kubernetes.io/hostname": "n2"},"#,
            r#""annotations": null, "labels": null,"#,
            "",
        ];
        let full = full_node("2025-01-01T00:00:10Z", "0");
        let rest = [
            String::new(),
            r#", "spec": {"podCIDR": "10.244.2.0/24", "podCIDRs": null}"#.into(),
            r#", "status": {"addresses": [{"type": "InternalIP"}, {"address": null}], "conditions": []}"#.into(),
            format!(r#", "spec": {}, "status": {}"#, full["spec"], full["status"]),
        ];
        let mut prints = std::collections::HashSet::new();
        for created in ["", r#""creationTimestamp": "2025-01-01T00:00:00Z","#] {
            for m in maps {
                for r in &rest {
                    let text = format!(
                        r#"{{"metadata": {{"name": "n\u0032", "uid": "u", "resourceVersion": "9", {created} {m} "managedFields": []}}{r}}}"#
                    );
                    let view: NodeView = serde_json::from_str(&text).expect(&text);
                    let mut h = keys.build_hasher();
                    view.hash_content(&mut h);
                    let print = NodeView::fingerprint_line(&text, &keys).expect(&text);
                    assert_eq!(print.content, h.finish(), "{text}");
                    assert_eq!(print.key, keys.hash_one(view.key()), "{text}");
                    assert_eq!(print.resource_version, "9");
                    prints.insert(print.content);
                }
            }
        }
        // The third and fourth maps are one spelled twice; the fifth, the sixth and the
        // seventh keep nothing but differ in null (none) and present (empty); the others differ.
        assert_eq!(prints.len(), 2 * (maps.len() - 2) * rest.len());
        // A heartbeat and an annotation the view skips leave the print; a condition's status,
        // an address, a kwire annotation change it.
        let print = |v: serde_json::Value| {
            NodeView::fingerprint_line(&v.to_string(), &keys)
                .unwrap()
                .content
        };
        let base = print(full_node("2025-01-01T00:00:10Z", "0"));
        assert_eq!(print(full_node("2025-01-01T00:05:10Z", "30")), base);
        let mut down = full_node("t", "0");
        down["status"]["conditions"][0]["status"] = "False".into();
        let mut moved = full_node("t", "0");
        moved["status"]["addresses"][0]["address"] = "192.0.2.3".into();
        let mut rekeyed = full_node("t", "0");
        rekeyed["metadata"]["annotations"]["kwire.dev/public-key"] = "BBBB".into();
        for changed in [down, moved, rekeyed] {
            assert_ne!(print(changed), base);
        }
        // What the view refuses is not fingerprinted either.
        for bad in [
            r#"{"metadata": {"resourceVersion": "1", "annotations": {"kwire.dev/a": 1}}}"#,
            r#"{"metadata": {"resourceVersion": "1", "creationTimestamp": "yesterday"}}"#,
            r#"{"metadata": {"resourceVersion": "1"}, "status": {"conditions": [{"type": "Ready"}]}}"#,
        ] {
            assert!(NodeView::fingerprint_line(bad, &keys).is_none(), "{bad}");
            assert!(serde_json::from_str::<NodeView>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn node_view_keeps_what_peer_selection_reads() {
        let view: NodeView =
            serde_json::from_value(full_node("2025-01-01T00:00:10Z", "0")).unwrap();
        let ann = view.metadata.annotations.clone().unwrap();
        assert_eq!(
            ann.keys().collect::<Vec<_>>(),
            ["kwire.dev/endpoint", "kwire.dev/public-key"]
        );
        // Labels: kwire's own only (the relay's location).
        let labels = view.metadata.labels.clone().unwrap();
        assert_eq!(labels.keys().collect::<Vec<_>>(), ["kwire.dev/location"]);
        assert!(view.metadata.managed_fields.is_none());
        let full: corev1::Node =
            serde_json::from_value(full_node("2025-01-01T00:00:10Z", "0")).unwrap();
        let a = crate::agent::peers::NodeInfo::from_node(&view.into_k8s());
        assert_eq!(a, crate::agent::peers::NodeInfo::from_node(&full));
        // A heartbeat and an annotation kwire does not read change nothing it reads.
        let later: NodeView =
            serde_json::from_value(full_node("2025-01-01T00:05:10Z", "30")).unwrap();
        assert_eq!(
            a,
            crate::agent::peers::NodeInfo::from_node(&later.into_k8s())
        );
        // From bytes (borrowed keys), as the watch reads it; null annotations are none.
        let bytes = serde_json::to_vec(&full_node("t", "0")).unwrap();
        let v: NodeView = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v.metadata.annotations.unwrap().len(), 2);
        let v: NodeView = serde_json::from_value(
            serde_json::json!({"metadata": {"name": "x", "annotations": null}}),
        )
        .unwrap();
        assert!(v.metadata.annotations.is_none());
        assert_eq!(NodeView::url_path(&(), None), "/api/v1/nodes");
    }

    #[test]
    fn policy_view_drops_annotations() {
        let v: NetworkPolicyView = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "x", "resourceVersion": "9",
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{...}"}},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}
        }))
        .unwrap();
        let np = v.into_k8s();
        assert!(np.metadata.annotations.is_none());
        let p = crate::policy::Policy::from_k8s(&np).unwrap();
        assert_eq!((p.namespace.as_str(), p.name.as_str()), ("x", "p"));
    }
}
