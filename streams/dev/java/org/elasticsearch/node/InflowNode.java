/*
 * Inflow's launcher for a genuine Elasticsearch node built from Maven Central jars.
 *
 * The official distribution is a tarball with modules that Maven Central does not carry. The
 * server jar and transport-netty4 are there, so this file starts the real server class
 * (org.elasticsearch.node.Node) with two classpath plugins: Netty4Plugin (HTTP and transport)
 * and RootPlugin, which restores `GET /` and `HEAD /` (their handler lives in the rest-root
 * module, absent from Central; official clients check that answer before any request).
 *
 * It lives in package org.elasticsearch.node because Node(NodeConstruction) and
 * NodeConstruction.prepareConstruction are package-private. MockPluginsService (from the test
 * framework jar) loads plugins from the classpath; nothing else of the test framework is used.
 *
 * Usage: java -Des.distribution.type=tar -cp 'libs/*:classes' org.elasticsearch.node.InflowNode HOME
 * Settings come from HOME/config/elasticsearch.yml, logging from HOME/config/log4j2.properties.
 * Inflow writes both (streams/dev/services.py) and compiles this file with javac.
 */
package org.elasticsearch.node;

import org.apache.logging.log4j.LogManager;
import org.apache.logging.log4j.Logger;
import org.apache.logging.log4j.core.LoggerContext;
import org.apache.logging.log4j.core.config.Configurator;
import org.elasticsearch.Build;
import org.elasticsearch.client.internal.node.NodeClient;
import org.elasticsearch.cluster.metadata.IndexNameExpressionResolver;
import org.elasticsearch.cluster.node.DiscoveryNodes;
import org.elasticsearch.cluster.service.ClusterService;
import org.elasticsearch.common.io.stream.NamedWriteableRegistry;
import org.elasticsearch.common.logging.LogConfigurator;
import org.elasticsearch.common.settings.ClusterSettings;
import org.elasticsearch.common.settings.IndexScopedSettings;
import org.elasticsearch.common.settings.Settings;
import org.elasticsearch.common.settings.SettingsFilter;
import org.elasticsearch.core.IOUtils;
import org.elasticsearch.env.Environment;
import org.elasticsearch.features.NodeFeature;
import org.elasticsearch.index.IndexVersion;
import org.elasticsearch.plugins.ActionPlugin;
import org.elasticsearch.plugins.MockPluginsService;
import org.elasticsearch.plugins.Plugin;
import org.elasticsearch.plugins.PluginsService;
import org.elasticsearch.rest.BaseRestHandler;
import org.elasticsearch.rest.RestController;
import org.elasticsearch.rest.RestHandler;
import org.elasticsearch.rest.RestRequest;
import org.elasticsearch.rest.RestResponse;
import org.elasticsearch.rest.RestStatus;
import org.elasticsearch.transport.netty4.Netty4Plugin;
import org.elasticsearch.xcontent.XContentBuilder;

import java.nio.file.Path;
import java.util.Collection;
import java.util.List;
import java.util.Map;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicReference;
import java.util.function.Predicate;
import java.util.function.Supplier;

public final class InflowNode extends Node {

    private static final List<Class<? extends Plugin>> PLUGINS = List.of(Netty4Plugin.class, RootPlugin.class);

    private InflowNode(Environment environment) {
        super(NodeConstruction.prepareConstruction(environment, new NodeServiceProvider() {
            @Override
            PluginsService newPluginService(Environment env, Settings settings) {
                return new MockPluginsService(settings, env, PLUGINS);
            }
        }, true));
    }

    public static void main(String[] args) throws Exception {
        if (args.length != 1) {
            System.err.println("usage: InflowNode ES_HOME (settings in ES_HOME/config/elasticsearch.yml)");
            System.exit(64);
        }
        Path home = Path.of(args[0]).toAbsolutePath();
        Settings input = Settings.builder().put(Environment.PATH_HOME_SETTING.getKey(), home.toString()).build();
        Environment environment = InternalSettingsPreparer.prepareEnvironment(
            input,
            Map.of(),
            home.resolve("config"),
            () -> "inflow-dev"
        );
        // Logging first, as the official bootstrap does: the node logs while it is built.
        LogConfigurator.registerErrorListener();
        LogConfigurator.setNodeName(Node.NODE_NAME_SETTING.get(environment.settings()));
        LogConfigurator.configure(environment, true);
        Logger logger = LogManager.getLogger(InflowNode.class);

        InflowNode node = null;
        try {
            node = new InflowNode(environment);
            node.start();
        } catch (Throwable t) {
            logger.error("node failed to start", t);
            if (node != null) {
                IOUtils.closeWhileHandlingException(node);
            }
            // Last line of the log, read by `inflow dev up` for its one-line error.
            logger.error("{} {}", FAILURE_MARKER, summary(t));
            Configurator.shutdown((LoggerContext) LogManager.getContext(false));
            System.exit(1);
        }
        // The node's threads are daemons: like the official bootstrap, hold the JVM open until
        // SIGTERM runs the shutdown hook below.
        InflowNode started = node;
        CountDownLatch keepAlive = new CountDownLatch(1);
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            try {
                started.prepareForClose();
                started.close();
                if (started.awaitClose(10, TimeUnit.SECONDS) == false) {
                    logger.warn("node did not stop within 10 seconds");
                }
            } catch (Exception e) {
                logger.warn("failure while stopping the node", e);
            } finally {
                Configurator.shutdown((LoggerContext) LogManager.getContext(false));
                keepAlive.countDown();
            }
        }, "inflow-node-shutdown"));
        logger.info("Inflow node started: Elasticsearch {} (genuine server jars)", Build.current().version());
        keepAlive.await();
    }

    static final String FAILURE_MARKER = "Inflow node failed to start:";

    /** "Type: message", then the root cause's when it differs: one line for a one-line error. */
    static String summary(Throwable t) {
        Throwable root = t;
        while (root.getCause() != null && root.getCause() != root) {
            root = root.getCause();
        }
        String text = t.getClass().getSimpleName() + ": " + t.getMessage();
        if (root != t) {
            text += " (caused by " + root.getClass().getSimpleName() + ": " + root.getMessage() + ")";
        }
        return text.replace('\n', ' ');
    }

    /** `GET /` and `HEAD /` as the rest-root module answers them (RestMainAction). */
    public static final class RootPlugin extends Plugin implements ActionPlugin {
        private final AtomicReference<ClusterService> clusterService = new AtomicReference<>();

        @Override
        public Collection<?> createComponents(PluginServices services) {
            clusterService.set(services.clusterService());
            return List.of();
        }

        @Override
        public Collection<RestHandler> getRestHandlers(
            Settings settings,
            NamedWriteableRegistry namedWriteableRegistry,
            RestController restController,
            ClusterSettings clusterSettings,
            IndexScopedSettings indexScopedSettings,
            SettingsFilter settingsFilter,
            IndexNameExpressionResolver indexNameExpressionResolver,
            Supplier<DiscoveryNodes> nodesInCluster,
            Predicate<NodeFeature> clusterSupportsFeature
        ) {
            return List.of(new RootHandler(clusterService));
        }
    }

    static final class RootHandler extends BaseRestHandler {
        private final AtomicReference<ClusterService> clusterService;

        RootHandler(AtomicReference<ClusterService> clusterService) {
            this.clusterService = clusterService;
        }

        @Override
        public String getName() {
            return "main_action";
        }

        @Override
        public List<Route> routes() {
            return List.of(new Route(RestRequest.Method.GET, "/"), new Route(RestRequest.Method.HEAD, "/"));
        }

        @Override
        protected RestChannelConsumer prepareRequest(RestRequest request, NodeClient client) {
            ClusterService cluster = clusterService.get();
            return channel -> {
                XContentBuilder builder = channel.newBuilder();
                if (request.hasParam("pretty") == false) {
                    builder.prettyPrint().lfAtEnd();
                }
                Build build = Build.current();
                builder.startObject();
                builder.field("name", cluster.getNodeName());
                builder.field("cluster_name", cluster.getClusterName().value());
                builder.field("cluster_uuid", cluster.state().metadata().clusterUUID());
                builder.startObject("version")
                    .field("number", build.qualifiedVersion())
                    .field("build_flavor", "default")
                    .field("build_type", build.type().displayName())
                    .field("build_hash", build.hash())
                    .field("build_date", build.date())
                    .field("build_snapshot", build.isSnapshot())
                    .field("lucene_version", IndexVersion.current().luceneVersion().toString())
                    .field("minimum_wire_compatibility_version", build.minWireCompatVersion())
                    .field("minimum_index_compatibility_version", build.minIndexCompatVersion())
                    .endObject();
                builder.field("tagline", "You Know, for Search");
                builder.endObject();
                channel.sendResponse(new RestResponse(RestStatus.OK, builder));
            };
        }
    }
}
